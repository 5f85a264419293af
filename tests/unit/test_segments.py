"""Token bookkeeping of one engine call: offsets, the kept prefix, continuation ids, query tokens."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from router.engine.base import TokenLogprobs
from router.segments import (
    Segment,
    continuation_ids,
    kept_token_count,
    query_positions,
    token_offsets,
)
from tests.scripted_engine import CharTokenizer

TOK = CharTokenizer()


def decode(ids: Sequence[int]) -> str:
    return TOK.decode(ids)


def encode(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def ids_of(*parts: str) -> list[int]:
    return [TOK.piece_id(p) for p in parts]


class ByteDecoder:
    """A byte-level decoder: ids are UTF-8 bytes (+1000), decoded with U+FFFD replacement.

    A prefix that ends inside a multi-byte character decodes to a trailing U+FFFD, exactly as a
    Hugging Face byte-level tokenizer does (`errors="replace"`).
    """

    BASE = 1000

    def encode(self, text: str) -> list[int]:
        return [b + self.BASE for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.BASE for i in ids).decode("utf-8", errors="replace")


# ----- token_offsets -------------------------------------------------------------------------


def test_offsets_of_single_character_tokens() -> None:
    assert token_offsets(encode("abc"), decode) == [(0, 1), (1, 2), (2, 3)]


def test_offsets_of_multi_character_tokens() -> None:
    ids = ids_of("<sea", "rch>", " Paris", "x")
    assert token_offsets(ids, decode) == [(0, 4), (4, 8), (8, 14), (14, 15)]


def test_offsets_are_empty() -> None:
    assert token_offsets([], decode) == []


def test_a_partial_character_prefix_is_owned_by_the_completing_token() -> None:
    bd = ByteDecoder()
    ids = bd.encode("aé€b")  # a, é (2 bytes), € (3 bytes), b
    assert len(ids) == 7
    # The raw prefix decode ends in U+FFFD while a character is incomplete.
    assert bd.decode(ids[:2]) == "a\ufffd"
    spans = token_offsets(ids, bd.decode)
    assert spans == [(0, 1), (1, 1), (1, 2), (2, 2), (2, 2), (2, 3), (3, 4)]
    # Spans tile the text without gaps or overlaps and end at the full decode's length.
    assert spans[-1][1] == len(bd.decode(ids))
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end == start


def test_offsets_never_step_back() -> None:
    # A decoder whose partial prefix is longer than the finished text (two replacement marks
    # for one finished character): spans stay monotonic.
    table = {1: "a", 2: "\ufffd\ufffd", 3: "é"}

    def odd_decode(ids: Sequence[int]) -> str:
        if list(ids[-2:]) == [2, 3]:
            return "".join(table[i] for i in ids[:-2]) + "é"
        return "".join(table[i] for i in ids)

    spans = token_offsets([1, 2, 3], odd_decode)
    assert all(start <= end for start, end in spans)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert spans[0] == (0, 1)


# ----- kept_token_count ---------------------------------------------------------------------


def test_kept_token_count_stops_at_a_straddling_token() -> None:
    spans = [(0, 4), (4, 8), (8, 12)]
    assert kept_token_count(spans, 12) == 3
    assert kept_token_count(spans, 8) == 2
    assert kept_token_count(spans, 10) == 2  # token 3 straddles the cut
    assert kept_token_count(spans, 3) == 0
    assert kept_token_count([], 5) == 0


def test_kept_token_count_empty_span_at_the_cut_belongs_beyond_it() -> None:
    # (2, 2) at the cut is the first byte of a character past it; (1, 1) inside is kept.
    assert kept_token_count([(0, 1), (1, 1), (1, 2), (2, 2), (2, 3)], 2) == 3


# ----- continuation_ids ----------------------------------------------------------------------


def test_continuation_keeps_every_id_when_nothing_was_cut() -> None:
    ids = ids_of("Par", "is")
    segment = Segment(text="Paris", token_ids=ids, stop=None, finish_reason="stop")
    assert continuation_ids(segment, decode, encode) == ids


def test_continuation_drops_the_stop_token_on_a_clean_cut() -> None:
    ids = ids_of(" Paris", "</search>")
    segment = Segment(text=" Paris", token_ids=ids, stop="</search>", finish_reason="stop")
    assert continuation_ids(segment, decode, encode) == ids[:1]


def test_continuation_reencodes_only_the_fragment_of_a_straddling_token() -> None:
    # " France </sea" + "rch>": the text ends at " France " and the third token straddles.
    ids = ids_of("capital", " of", " France </sea", "rch>")
    segment = Segment(text="capital of France ", token_ids=ids, stop="</search>", finish_reason="stop")
    kept = continuation_ids(segment, decode, encode)
    assert kept == ids[:2] + encode(" France ")
    assert decode(kept) == segment.text


def test_continuation_of_a_stop_inside_the_first_token() -> None:
    ids = ids_of("ab</search>")
    segment = Segment(text="ab", token_ids=ids, stop="</search>", finish_reason="stop")
    assert continuation_ids(segment, decode, encode) == encode("ab")


def test_continuation_keeps_every_byte_of_a_character_at_the_cut() -> None:
    bd = ByteDecoder()
    ids = bd.encode("café</search>")
    segment = Segment(text="café", token_ids=ids, stop="</search>", finish_reason="stop")
    kept = continuation_ids(segment, bd.decode, bd.encode)
    assert kept == bd.encode("café")
    assert bd.decode(kept) == "café"


def test_continuation_cut_before_a_multibyte_character() -> None:
    bd = ByteDecoder()
    # The stop string is "é" here; the text ends before its first byte.
    ids = bd.encode("caé")
    segment = Segment(text="ca", token_ids=ids, stop="é", finish_reason="stop")
    assert continuation_ids(segment, bd.decode, bd.encode) == bd.encode("ca")


# ----- query_positions -----------------------------------------------------------------------


def _lp(token_id: int, logprob: float) -> TokenLogprobs:
    return TokenLogprobs(token_id=token_id, logprob=logprob)


def _segment(parts: Sequence[str], text: str, stop: str | None) -> Segment:
    ids = ids_of(*parts)
    return Segment(
        text=text,
        token_ids=ids,
        logprobs=[_lp(t, -0.1 * (i + 1)) for i, t in enumerate(ids)],
        stop=stop,
        finish_reason="stop",
    )


def test_query_positions_take_exactly_the_query_tokens() -> None:
    parts = ["<search>", " capital", " of", " France", " ", "</sea", "rch>"]
    text = "<search> capital of France "
    segment = _segment(parts, text, "</search>")
    start = len("<search> ")
    end = start + len("capital of France")
    got = query_positions(segment, decode, start, end)
    assert [p.token_id for p in got] == ids_of(" capital", " of", " France")


def test_query_positions_include_a_token_carrying_the_last_word_and_the_closing_tag() -> None:
    parts = ["<search>", " Paris", " pop</sea", "rch>"]
    segment = _segment(parts, "<search> Paris pop", "</search>")
    got = query_positions(segment, decode, 9, 18)
    assert [p.token_id for p in got] == ids_of(" Paris", " pop</sea")


def test_query_positions_exclude_whitespace_only_tokens_inside_the_query() -> None:
    parts = ["a", " ", " ", "b"]
    segment = _segment(parts, "a  b", None)
    got = query_positions(segment, decode, 0, 4)
    assert [p.token_id for p in got] == ids_of("a", "b")


def test_query_positions_without_logprobs_are_empty() -> None:
    segment = Segment(text="abc", token_ids=encode("abc"))
    assert query_positions(segment, decode, 0, 3) == []


def test_query_positions_of_an_empty_range_are_empty() -> None:
    segment = _segment(["<search>", "  ", "</search>"], "<search>  ", "</search>")
    assert query_positions(segment, decode, 10, 10) == []
