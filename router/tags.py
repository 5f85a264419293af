"""Text rules of the self-search protocol: tags, document formatting, answer extraction.

The model writes `<think>`, `<search> q </search>`, `<information> ... </information>` and
`<answer> ... </answer>`. Parsing is deliberately strict (exact lower-case tags, no spaces),
because those are the literal strings the model was trained on and the strings the server
stops generation at. Sanitising web documents is deliberately broad (any case, spaces, a
slash anywhere between `<` and the name), so that nothing a web page contains can be read as
a protocol tag by this parser, by a looser one, or by the model itself.

Pure functions, no I/O.
"""

from __future__ import annotations

import re
import string
import unicodedata
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

THINK: Final = "think"
SEARCH: Final = "search"
INFORMATION: Final = "information"
ANSWER: Final = "answer"
TAG_NAMES: Final[tuple[str, ...]] = (THINK, SEARCH, INFORMATION, ANSWER)


def open_tag(name: str) -> str:
    """`<name>`, the literal opening string of a protocol tag."""
    return f"<{name}>"


def close_tag(name: str) -> str:
    """`</name>`, the literal closing string of a protocol tag."""
    return f"</{name}>"


THINK_OPEN: Final = open_tag(THINK)
THINK_CLOSE: Final = close_tag(THINK)
SEARCH_OPEN: Final = open_tag(SEARCH)
SEARCH_CLOSE: Final = close_tag(SEARCH)
INFORMATION_OPEN: Final = open_tag(INFORMATION)
INFORMATION_CLOSE: Final = close_tag(INFORMATION)
ANSWER_OPEN: Final = open_tag(ANSWER)
ANSWER_CLOSE: Final = close_tag(ANSWER)
# Hermes-style tool-call tags (SmolLM2's chat template, vLLM's hermes tool parser, the
# composition prompt): not protocol tags, but a document that spells them could choose the
# arguments of a tool call forced after a search, so documents may not spell them either.
TOOL_TAG_NAMES: Final[tuple[str, ...]] = ("tool_call", "tool_response", "tools")

NO_RESULTS: Final = "No results found."
# Replaces `<` where a document would otherwise spell a protocol tag: still readable, never
# a tag (SINGLE LEFT-POINTING ANGLE QUOTATION MARK).
SAFE_LT: Final = "\u2039"
ELLIPSIS: Final = "\u2026"

# Characters that render as nothing (or next to nothing) and that a page could slip between
# `<` and `/answer` to dodge the tag check while a model still reads a tag: every format
# character (category Cf, e.g. U+200E, U+2062-U+2064, U+E0020, ZWJ/ZWNJ) is dropped by
# category; these are the default-ignorable ones of other categories (U+034F combining
# grapheme joiner, Hangul fillers, variation selectors). Emoji lose a ZWJ or a variation
# selector; a search snippet can afford that, a forged tag it cannot.
_IGNORABLE: Final = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0"
    + "".join(chr(c) for c in range(0x180B, 0x1810))
    + "".join(chr(c) for c in range(0xFE00, 0xFE10))
    + "".join(chr(c) for c in range(0xE0100, 0xE01F0))
)
# Glyphs a reader (or a model) takes for `<` and `/` that NFKC leaves alone (NFKC already
# folds fullwidth U+FF1C and small U+FE64 into `<`, fullwidth U+FF0F into `/`; it composes
# `<` + U+0338 into U+226E, listed here).
_LT_LIKE: Final = "<\u02c2\u1438\u2039\u226e\u2329\u27e8\u276c\u276e\u2770\u3008"
_SLASH_LIKE: Final = "/\u2044\u2215\u2571\u29f8"
# Glyphs taken for `|`, which opens a chat-template special marker (`<|im_start|>`,
# `<|endoftext|>`); NFKC already folds fullwidth U+FF5C (DeepSeek's `<｜...｜>`) into `|`.
_BAR_LIKE: Final = "|\u01c0\u2223\u2502\u23d0\u2758"
# Whitespace, or combining marks that do not compose with `<` and so stay visible next to it.
_WS: Final = r"[\s\u0300-\u036f\u20d0-\u20ff\ufe20-\ufe2f]*"
# Names a document may not start after `<`: the protocol's, and `tool`, a prefix that covers
# TOOL_TAG_NAMES and every spelling of their separator (`<tool call>`, `<Tool-Call>`).
_GUARDED_NAMES: Final = "|".join((*TAG_NAMES, "tool"))
# `<` (or a look-alike), optional space, then either optional `/`, optional space and a
# guarded name (any case, no word boundary required: `<answer2>` is neutralised too;
# over-matching only costs one glyph), or a `|` that would open a special marker.
_TAG_LIKE = re.compile(
    rf"[{_LT_LIKE}](?={_WS}(?:[{_SLASH_LIKE}]?{_WS}(?:{_GUARDED_NAMES})|[{_BAR_LIKE}]))", re.IGNORECASE
)
_WHITESPACE_RUN = re.compile(r"\s+")
# Exact protocol tags, as the parser reads them.
_OPEN_TAG = re.compile(rf"<({'|'.join(TAG_NAMES)})>")
_ANY_TAG = re.compile(rf"</?(?:{'|'.join(TAG_NAMES)})>")
# Three or more line breaks (possibly with trailing blanks) left where tags were removed.
_BLANK_LINES = re.compile(r"(?:[ \t]*\n){3,}")
# What a URL placed in the trace or a citation may keep as is: RFC 3986 unreserved and
# reserved characters minus the quote; `%` so existing escapes survive. Everything else
# (`<`, `>`, `"`, `'`, backtick, whitespace, controls, any non-ASCII look-alike) is
# percent-encoded, so a URL can never spell a tag or break out of an attribute.
_URL_SAFE: Final = "!#$%&()*+,-./:;=?@[]_~"
_URL_SCHEMES: Final = ("http://", "https://")


def drop_control(text: str) -> str:
    """Remove control characters and invisible ones; newline and tab become spaces later,
    so they are kept here to stop words from gluing together."""
    return "".join(
        ch
        for ch in text
        if ch in "\n\t" or (unicodedata.category(ch) not in ("Cc", "Cf") and ch not in _IGNORABLE)
    )


def sanitize_document_text(text: str) -> str:
    """Make web text safe to place inside an `<information>` block.

    The text is NFKC-normalised (fullwidth and small `<` become `<`) and control and
    invisible characters are dropped, before and after, because normalising can compose
    characters and dropping can bring parts of a tag together. Every whitespace run
    (newlines included) becomes one space so a document stays on its one line, and any `<`
    or `<` look-alike that would start something read as a protocol tag (`</information>`,
    `< / Answer >`, `〈answer>`), a tool-call tag (`<tool_call>`, `</Tool_Response>`,
    `<tools>`) or a chat-template special marker (`<|im_start|>`, `<|endoftext|>`) becomes
    `‹`, so inserted text can never open or close any of them, nor become a special token.
    Other markup (`<b>`, `a < b`) is left as is. Neutralising runs last, after the text can
    no longer change shape.
    """
    text = drop_control(unicodedata.normalize("NFKC", drop_control(text)))
    text = _WHITESPACE_RUN.sub(" ", text).strip()
    return _TAG_LIKE.sub(SAFE_LT, text)


def sanitize_url(url: str | None) -> str | None:
    """A document URL safe to show in the trace and in `url_citation`s, else None.

    Only http(s) URLs are kept (no `javascript:`); control and invisible characters are
    dropped, and every character outside `_URL_SAFE` is percent-encoded (UTF-8), so no
    `<`, `>`, quote or whitespace, and no `<` look-alike, survives.
    """
    if not url:
        return None
    url = drop_control(url).strip()
    if not url.lower().startswith(_URL_SCHEMES):
        return None
    return urllib.parse.quote(url, safe=_URL_SAFE)


# A document cut mid-sentence ends in "…", which a small model copies into its answer (and
# into a JSON string it then never closes); a cut at a sentence end reads as a whole fact.
# A sentence that ends within SENTENCE_SLACK x the limit (at most SENTENCE_SLACK_MAX_CHARS more)
# is finished rather than cut: guided mode's 150 characters become at most 225.
CUT_AT_SENTENCE: bool = True
SENTENCE_SLACK: float = 0.5
SENTENCE_SLACK_MAX_CHARS = 100
# A full stop after an initial ("J. K. Rowling", "U.S.") or a short title ends no sentence.
_SENTENCE_END = re.compile(
    r"(?<!\b[A-Za-z])(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bMt)(?<!\bJr)(?<!\bSr)"
    r"(?<!\bvs)(?<!\bNo)[.!?](?=\s|$)"
)


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters (up to `SENTENCE_SLACK` more to finish a sentence): at the
    last sentence end in the last half, else at a word boundary there with `…` appended."""
    if len(text) <= limit:
        return text
    stretched = limit + min(int(limit * SENTENCE_SLACK), SENTENCE_SLACK_MAX_CHARS)
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, stretched + 1)] if CUT_AT_SENTENCE else []
    within = [e for e in ends if limit // 2 <= e <= limit]
    if within:
        return text[: within[-1]]
    beyond = [e for e in ends if limit < e <= stretched]
    if beyond:
        return text[: beyond[0]]
    head = text[:limit]
    space = head.rfind(" ")
    # Cutting at a space far back would throw away most of the budget; cut mid-word then.
    if space >= limit // 2:
        head = head[:space]
    return head.rstrip() + ELLIPSIS


class DocumentLike(Protocol):
    """What format_documents reads: `router.search.base.Document` or anything shaped so."""

    @property
    def title(self) -> str: ...

    @property
    def text(self) -> str: ...


def format_documents(docs: Sequence[DocumentLike], max_chars_per_doc: int) -> str:
    """Search-R1's layout, one document per line: `Doc 1(Title: <title>) <text>`.

    Titles and texts are sanitised; both are cut to `max_chars_per_doc` characters (a title
    is normally far shorter; the cap only bounds a hostile one).
    """
    if max_chars_per_doc <= 0:
        raise ValueError(f"max_chars_per_doc must be positive, got {max_chars_per_doc}")
    if not docs:
        return NO_RESULTS
    lines: list[str] = []
    for i, doc in enumerate(docs, start=1):
        title = _cut(sanitize_document_text(doc.title), max_chars_per_doc)
        text = _cut(sanitize_document_text(doc.text), max_chars_per_doc)
        lines.append(f"Doc {i}(Title: {title}) {text}".rstrip())
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class TagBlock:
    """One top-level protocol block, as character offsets into the parsed text."""

    tag: str
    # Offset of the opening `<` and just past the closing tag (len(text) when unclosed).
    start: int
    end: int
    # Offsets of the content between the tags (content_end = end when unclosed).
    content_start: int
    content_end: int
    closed: bool

    def content(self, text: str) -> str:
        """The block's content in `text` (the string it was parsed from), unstripped."""
        return text[self.content_start : self.content_end]


def find_tag_blocks(text: str) -> list[TagBlock]:
    """The top-level protocol blocks of `text`, in order.

    A block of tag T runs from `<T>` to the first `</T>` after it. Everything inside, any
    other opening tag included (also another `<T>`), is content: the protocol does not nest,
    and this mirrors how the server cuts generation at the first closing tag. Text between
    blocks and stray closing tags are not blocks. Only the last block can be unclosed; it
    then runs to the end of the text.
    """
    blocks: list[TagBlock] = []
    pos = 0
    while (opening := _OPEN_TAG.search(text, pos)) is not None:
        tag = opening.group(1)
        content_start = opening.end()
        close_at = text.find(close_tag(tag), content_start)
        if close_at < 0:
            end = len(text)
            blocks.append(TagBlock(tag, opening.start(), end, content_start, end, False))
            break
        end = close_at + len(close_tag(tag))
        blocks.append(TagBlock(tag, opening.start(), end, content_start, close_at, True))
        pos = end
    return blocks


def extract_last_answer(text: str) -> str | None:
    """Stripped content of the last complete top-level `<answer>...</answer>`, else None.

    Top-level only (see find_tag_blocks): an `<answer>` written inside an `<information>`
    block is content of that block, never the answer. An unclosed answer does not count.
    """
    for block in reversed(find_tag_blocks(text)):
        if block.tag == ANSWER and block.closed:
            return block.content(text).strip()
    return None


# What a small model invents around an answer that is no part of it: markup (`<source=...`,
# `<b>`, a tag it never closed, cut at the end of the text), and URLs or their fragments.
_INVENTED_MARKUP = re.compile(r"</?[A-Za-z!][^<>\n]*(?:>|$)")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_SPACE_RUN = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"[ \t]+([,.;:!?])")


def clean_answer(answer: str) -> tuple[str, list[str]]:
    """A free-text answer without the markup and URLs the model invented, and what was removed
    (for the trace). `a < b` and `x<3` stay: only `<` before a letter, `/` or `!` starts markup."""
    removed: list[str] = []

    def drop(match: re.Match[str]) -> str:
        removed.append(match.group(0))
        return ""

    def drop_url(match: re.Match[str]) -> str:
        removed.append(match.group(0))
        return " "

    text = _URL.sub(drop_url, _INVENTED_MARKUP.sub(drop, answer))
    cleaned = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", _SPACE_RUN.sub(" ", text)).strip()
    return (cleaned, removed) if removed else (answer, [])


def without_partial_close(text: str, tags: Sequence[str]) -> str:
    """Drop a closing tag the model began but did not finish (`... Paris</ans` then EOS).

    Any of the call's stop strings counts (native mode's free text ends at `</answer>` and
    watches `</search>`); a single character (`<`) is kept: it may be the model's text.
    """
    for size in range(max((len(t) for t in tags), default=0) - 1, 1, -1):
        if any(len(t) > size and text.endswith(t[:size]) for t in tags):
            return text[:-size]
    return text


def strip_tags(text: str) -> str:
    """`text` with every exact protocol tag removed, blank-line runs folded, ends stripped.

    The fallback final text when the model never wrote an answer.
    """
    text = _ANY_TAG.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION: Final = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation: lower case, drop ASCII punctuation and the articles
    a/an/the, fold whitespace. Kept byte-for-byte compatible with the official script so
    exact-match numbers compare with published ones."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())
