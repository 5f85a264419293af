"""Search results made safe where they enter: valid text, plain titles and snippets, http(s) URLs.

A provider's answer is untrusted input. One lone surrogate in a snippet made every route
that serialises documents fail (JSON cannot encode it), a `javascript:` URL or a `<script>`
title went out as is through `/v1/search`, `/retrieve` and `url_citation`s, and since the
cache stores what a backend returned, one bad result stayed for the whole TTL. So every
document is normalised once, as a backend's answer arrives (`ResilientBackend`, and
`SearchService` for a backend used without the wrappers), before anything caches, inserts
or returns it; every route downstream then sees the same clean documents.

What "normalised" means (`normalize_document`):

- text is valid Unicode: surrogate pairs are joined, lone surrogates dropped;
- control and invisible characters are dropped (`router.tags.drop_control`);
- titles and snippets are plain text: HTML tags, comments and `<script>`/`<style>`
  elements are removed, entities are unescaped, and markup the unescaping revealed is
  removed too. Bare protocol and tool-call tags (`<answer>`, `</information>`,
  `<tool_call>`) are the one exception: they are kept for the loop's own neutraliser
  (`router.tags.sanitize_document_text`), which makes them inert but visible (`‹answer>`),
  so a trace still shows what a page tried. A `<` still left that would open a tag
  (`<script` cut off before its `>`) becomes `‹`;
- the URL is an http(s) URL or None (`router.tags.sanitize_url`);
- the score is a finite number or None (JSON has no NaN).

A document with neither title nor text left, or one normalising fails on, is dropped.

Pure functions, no I/O.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable
from typing import Final

from router.search.base import Document, SearchResponseError
from router.tags import SAFE_LT, TAG_NAMES, TOOL_TAG_NAMES, drop_control, sanitize_url

# Passes of markup removal: one pass can reveal a tag (`<<b>script>`), so it repeats until
# nothing changes; the bound stops a hostile nesting from costing quadratic time (what a
# last pass leaves is neutralised by `_TAG_START` anyway).
_MAX_STRIP_PASSES: Final = 4
# Markup as an HTML parser reads it: a comment, a whole `<script>`/`<style>` element (its
# content is code, not text; unclosed, it runs to the end), a tag (`<` then a letter, or
# `</` then a letter, up to `>`), a declaration or processing instruction (`<!...>`, `<?...>`).
_MARKUP = re.compile(
    r"<!--.*?(?:-->|$)"
    r"|<(script|style)\b[^>]*>.*?(?:</\1\s*>|$)"
    r"|</?[A-Za-z][^<>]*>"
    r"|<[!?][^<>]*>",
    re.IGNORECASE | re.DOTALL,
)
# Runs of whitespace other than line breaks, which removed markup and characters leave.
_SPACE_RUN = re.compile(r"[^\S\n]+")
# The bare tags kept for the loop's neutraliser (see the module docstring), less their `<`.
_GUARDED_REST: Final = rf"/?(?:{'|'.join((*TAG_NAMES, *TOOL_TAG_NAMES))})\s*>"
_GUARDED_TAG = re.compile(rf"<{_GUARDED_REST}", re.IGNORECASE)
# A `<` an HTML parser would take as the start of a tag, other than a kept guarded tag's.
_TAG_START = re.compile(rf"<(?!{_GUARDED_REST})(?=[A-Za-z/!?])", re.IGNORECASE)


def valid_unicode(text: str) -> str:
    """`text` as valid Unicode: surrogate pairs joined into one character, lone ones dropped.

    A lone surrogate (JSON's `"\\ud800"` decodes to one) cannot be encoded as UTF-8, so a
    response holding one fails to serialise; a pair left split would fail the same way.
    """
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text  # the common case, without the round trip
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "ignore")


def _strip_markup(text: str) -> str:
    """`text` without HTML markup, repeated until removing reveals no more (bounded)."""

    def keep_guarded(match: re.Match[str]) -> str:
        return match.group(0) if _GUARDED_TAG.fullmatch(match.group(0)) else ""

    for _ in range(_MAX_STRIP_PASSES):
        stripped = _MARKUP.sub(keep_guarded, text)
        if stripped == text:
            break
        text = stripped
    return text


def plain_text(text: str) -> str:
    """A provider's title or snippet as plain text (the module docstring says what that is).

    Invisible characters go before markup is looked for (`<\\u200bscript>` must not hide a
    tag) and again after unescaping (`&#x200b;`, `&#0;`); markup goes before unescaping
    (so `&lt;` in prose is not mistaken for a tag of the page) and again after it (so an
    escaped `&lt;script&gt;` cannot become one). Space runs become one space and ends are
    stripped; line breaks stay (a provider may join several snippets with them).
    """
    text = _strip_markup(drop_control(valid_unicode(text)))
    text = _strip_markup(drop_control(valid_unicode(html.unescape(text))))
    return _SPACE_RUN.sub(" ", _TAG_START.sub(SAFE_LT, text)).strip()


def _clean_str(value: object) -> str:
    """An identifier-like field (source, id) as valid text without control characters."""
    return drop_control(valid_unicode(str(value))).strip()


def _finite(score: object) -> float | None:
    """The score as a finite float, else None: JSON has no NaN or infinity, so one would
    fail the response it is in."""
    if isinstance(score, bool) or not isinstance(score, int | float | str):
        return None
    try:
        value = float(score)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def normalize_document(doc: Document) -> Document | None:
    """`doc` normalised (see the module docstring), or None when nothing usable is left.

    Never raises: a document normalising fails on is one result lost, never a failed search.
    """
    try:
        # A missing title or text (a backend's bug) is an empty one, not a lost document.
        title = plain_text(doc.title or "")
        text = plain_text(doc.text or "")
        if not title and not text:
            return None
        url = sanitize_url(valid_unicode(doc.url)) if doc.url else None
        return Document(
            title=title,
            text=text,
            url=url,
            score=_finite(doc.score),
            source=_clean_str(doc.source) if doc.source else "",
            id=_clean_str(doc.id) if doc.id is not None else None,
        )
    except Exception:  # a malformed result (wrong types, say) is dropped, never raised
        return None


def usable_documents(backend: str, documents: Iterable[Document]) -> list[Document]:
    """A backend's answer, each document normalised, the unusable ones dropped.

    An answer that had documents but none usable is the provider's failure, not "nothing
    found": it raises `SearchResponseError`, so the chain moves on and the loop falls back to
    self-fill, saying why in the trace, and nothing is cached.
    """
    raw = list(documents)
    kept = [d for d in map(normalize_document, raw) if d is not None]
    if raw and not kept:
        raise SearchResponseError(f"{backend}: none of the {len(raw)} results was usable")
    return kept
