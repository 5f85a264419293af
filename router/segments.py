"""Token bookkeeping for one engine call of the loop: offsets, cuts, and query tokens.

Everything here works from the token ids the engine generated and their decoded text;
nothing re-tokenises generated text to find where a query lies. Pure logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.engine.base import TokenLogprobs

Decode = Callable[[Sequence[int]], str]


def token_offsets(token_ids: Sequence[int], decode: Decode) -> list[tuple[int, int]]:
    """Character span of every token within `decode(token_ids)`.

    Decoding growing prefixes (rather than tokens one by one) keeps multi-byte characters
    that span several byte-level tokens intact: such a token gets an empty span until the
    character completes, and the completing token owns it.
    """
    spans = []
    previous = 0
    total = len(token_ids)
    for i in range(1, total + 1):
        text = decode(token_ids[:i])
        # A prefix ending inside a multi-byte character decodes to a trailing U+FFFD: that
        # character is not there yet (the completing token owns it). The full decode is
        # taken as it is. Never step back.
        if i < total:
            text = text.rstrip("\ufffd")
        length = max(len(text), previous)
        spans.append((previous, length))
        previous = length
    return spans


@dataclass
class Segment:
    """The outcome of one engine call, cut at the stop string that ended it."""

    # Text the engine produced before the stop string (what the transcript keeps).
    text: str = ""
    # Every generated token id and its logprobs (the stop string's tokens included).
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # The stop string that ended the call, or None (EOS, length, abort).
    stop: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def kept_token_count(spans: Sequence[tuple[int, int]], text_length: int) -> int:
    """How many leading tokens lie wholly inside the first `text_length` characters."""
    kept = 0
    for start, end in spans:
        # An empty span at the cut is the first byte of a character beyond it.
        if end > text_length or start == end == text_length:
            break
        kept += 1
    return kept


def continuation_ids(segment: Segment, decode: Decode, encode: Callable[[str], list[int]]) -> list[int]:
    """Token ids that spell exactly `segment.text`, for the next call's prompt.

    The engine's own ids are kept up to the stop string, so the prefix cache still hits; a
    token that straddles the stop string is dropped and the few characters of it that
    belong before the stop are encoded again (a fragment, never the whole text).
    """
    spans = token_offsets(segment.token_ids, decode)
    decoded = spans[-1][1] if spans else 0
    if segment.stop is None and decoded == len(segment.text):
        return list(segment.token_ids)
    kept = kept_token_count(spans, len(segment.text))
    ids = list(segment.token_ids[:kept])
    covered = spans[kept - 1][1] if kept else 0
    if covered < len(segment.text):
        ids.extend(encode(segment.text[covered:]))
    return ids


def query_positions(segment: Segment, decode: Decode, start: int, end: int) -> list[TokenLogprobs]:
    """Logprobs of the tokens that carry the query `segment.text[start:end]`.

    A token counts when its span overlaps the query on a non-blank character, so the
    token that holds the query's last word and the first characters of `</search>` counts,
    and a lone space token before the closing tag does not.
    """
    if not segment.logprobs:
        return []
    spans = token_offsets(segment.token_ids, decode)
    positions = []
    full = decode(segment.token_ids)
    for (span_start, span_end), position in zip(spans, segment.logprobs, strict=False):
        lo, hi = max(span_start, start), min(span_end, end)
        if lo < hi and full[lo:hi].strip():
            positions.append(position)
    return positions
