"""Token bookkeeping for one engine call of the loop: offsets, cuts, and query tokens.

Everything here works from the token ids the engine generated and their decoded text;
nothing re-tokenises generated text to find where a query lies. Pure logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.engine.base import TokenLogprobs

Decode = Callable[[Sequence[int]], str]


# A character still incomplete after this many tokens is given up on (its bytes are taken as
# decoded, U+FFFD and all); keeps every decode window, and so the whole pass, bounded.
_MAX_PENDING_TOKENS = 8
_REPLACEMENT = "\ufffd"


def token_offsets(token_ids: Sequence[int], decode: Decode) -> list[tuple[int, int]]:
    """Character span of every token within `decode(token_ids)`, in one linear pass.

    Incremental detokenisation as vLLM's detokenizer does it: each step decodes only a short
    window (the previous emitted token(s) as context, plus the tokens since), so the cost is
    O(len(token_ids)) decode calls of bounded length, not a decode of every growing prefix.

    A byte-level token may hold only part of a UTF-8 character (CJK, emoji, many scripts):
    the window then decodes to a trailing U+FFFD. Such a token is never dropped: its span
    reaches over the character it starts, and the token that completes the character spans
    it too, so every token that carries part of a character overlaps that character. Spans
    are therefore contiguous and non-decreasing (`end` never steps back) but may overlap by
    one character where a character is split across tokens. The last token takes the full
    decode as it is.
    """
    total = len(token_ids)
    spans: list[tuple[int, int]] = []
    # Characters confirmed so far, and the window [prefix_offset, read_offset) whose decode is
    # `prefix_text`: the context the next token's text is read against.
    emitted = 0
    prefix_offset = read_offset = 0
    prefix_text = ""
    previous_end = 0
    for i in range(total):
        window = decode(token_ids[prefix_offset : i + 1])
        fresh = window[len(prefix_text) :] if window.startswith(prefix_text) else window
        last = i == total - 1
        pending = not last and fresh.endswith(_REPLACEMENT) and i + 1 - read_offset < _MAX_PENDING_TOKENS
        visible = fresh.rstrip(_REPLACEMENT) if pending else fresh
        end = max(previous_end, emitted + len(visible))
        # A token that leaves a character incomplete also spans that character.
        spans.append((previous_end, end + 1 if pending else end))
        previous_end = end
        if not pending:
            emitted = end
            prefix_offset, read_offset = read_offset, i + 1
            prefix_text = decode(token_ids[prefix_offset:read_offset]) if not last else ""
    if spans:
        # A character left incomplete at the very end cannot lie beyond the text.
        final = spans[-1][1]
        spans = [(min(a, final), min(b, final)) for a, b in spans]
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
        # A token that reaches past the cut (the start of a character beyond it) is not kept;
        # nor is an empty span at the cut.
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
