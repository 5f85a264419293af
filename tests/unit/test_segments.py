"""Token bookkeeping of one engine call: offsets, the kept prefix, continuation ids, query tokens."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

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


def test_a_partial_character_token_spans_the_character_it_starts() -> None:
    bd = ByteDecoder()
    ids = bd.encode("aé€b")  # a, é (2 bytes), € (3 bytes), b
    assert len(ids) == 7
    # The raw prefix decode ends in U+FFFD while a character is incomplete.
    assert bd.decode(ids[:2]) == "a\ufffd"
    spans = token_offsets(ids, bd.decode)
    # Every byte of é spans é, every byte of € spans €: no token is left with an empty span.
    assert spans == [(0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3), (3, 4)]
    assert spans[-1][1] == len(bd.decode(ids))
    # Contiguous: each span starts where the previous one ends or inside it, never beyond.
    for (start_a, end_a), (start_b, end_b) in itertools.pairwise(spans):
        assert start_a <= start_b <= end_a <= end_b


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
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(spans))
    assert spans[0] == (0, 1)
    assert spans[-1][1] == len(odd_decode([1, 2, 3]))


class CountingDecoder:
    """Wraps a decoder and counts its calls and the ids it was handed."""

    def __init__(self, inner: ByteDecoder) -> None:
        self.inner = inner
        self.calls = 0
        self.ids = 0

    def __call__(self, ids: Sequence[int]) -> str:
        self.calls += 1
        self.ids += len(ids)
        return self.inner.decode(ids)


def test_offsets_are_linear_in_the_number_of_tokens() -> None:
    # Issue 13 item 14: decoding growing prefixes made this quadratic. Count the work.
    bd = ByteDecoder()
    unit = "ascii, é, 東京, 🐍, שלום. "
    for repeat in (10, 40, 160):
        ids = bd.encode(unit * repeat)
        counting = CountingDecoder(bd)
        spans = token_offsets(ids, counting)
        assert spans[-1][1] == len(unit * repeat)
        # At most two decodes per token, each of a bounded window (the longest character is
        # 4 bytes, plus one token of context).
        assert counting.calls <= 2 * len(ids)
        assert counting.ids <= 8 * len(ids)


def test_an_endless_incomplete_character_does_not_grow_the_window() -> None:
    # Stray lead bytes that never complete: the window is cut after a few tokens.
    bd = ByteDecoder()
    ids = [0xE3 + ByteDecoder.BASE] * 200
    counting = CountingDecoder(bd)
    spans = token_offsets(ids, counting)
    assert len(spans) == 200
    assert counting.ids <= 20 * len(ids)
    assert spans[-1][1] == len(bd.decode(ids))


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


# ----- multi-byte queries with the real byte-level tokenizer --------------------------------

MODEL_DIR = Path.home() / ".cache" / "ssrl" / "models" / "smollm2-135m-instruct"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table (SmolLM2's byte-level BPE uses it), inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    if not (MODEL_DIR / "tokenizer.json").exists():
        pytest.skip("the default model's tokenizer is not prepared")
    # The `tokenizers` library alone (what transformers wraps): same ids, no heavy import.
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


QUERIES = {
    "japanese": "東京タワーの高さは何メートルですか",
    "chinese": "长城有多长",
    "emoji": "🐍 python 🧑‍💻 snake 🇯🇵",
    "combining": "Ame\u0301lie cafe\u0301 Zoe\u0308",
    "arabic": "ما هي عاصمة مصر",
    "hebrew": "מי כתב את התנ״ך",
    "mixed": "Tōkyō 東京 population 👍🏽",
}


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_every_query_token_counts_with_the_real_tokenizer(hf_tokenizer: Any, name: str) -> None:
    query = QUERIES[name]
    prefix = "<search> "

    def enc(text: str) -> list[int]:
        return list(hf_tokenizer.encode(text, add_special_tokens=False).ids)

    def dec(token_ids: Sequence[int]) -> str:
        return str(hf_tokenizer.decode(list(token_ids), skip_special_tokens=False))

    ids = enc(prefix + query + " </search>")

    # Ground truth by bytes: a token counts when one of its bytes lies in the query and the
    # query's characters it touches are not all blank.
    table = _byte_decoder()
    token_bytes = [bytes(table[c] for c in t) for t in (hf_tokenizer.id_to_token(i) for i in ids)]
    q_lo = len(prefix.encode())
    q_hi = q_lo + len(query.encode())
    full_bytes = b"".join(token_bytes)
    expected = []
    at = 0
    for i, tb in enumerate(token_bytes):
        lo, hi = max(at, q_lo), min(at + len(tb), q_hi)
        if lo < hi:
            # The characters touched: widen to UTF-8 character boundaries.
            while lo > 0 and (full_bytes[lo] & 0xC0) == 0x80:
                lo -= 1
            while hi < len(full_bytes) and (full_bytes[hi] & 0xC0) == 0x80:
                hi += 1
            if full_bytes[lo:hi].decode("utf-8").strip():
                expected.append(i)
        at += len(tb)
    partial = [i for i, tb in enumerate(token_bytes) if "\ufffd" in tb.decode("utf-8", errors="replace")]

    text = dec(ids)
    cut = text.index("</search>")
    segment = Segment(
        text=text[:cut],
        token_ids=ids,
        logprobs=[TokenLogprobs(token_id=t, logprob=-float(i)) for i, t in enumerate(ids)],
        stop="</search>",
        finish_reason="stop",
    )
    start = len(prefix)
    got = query_positions(segment, dec, start, start + len(query))
    assert [-p.logprob for p in got] == expected
    assert len(got) == len(expected) >= len(query.split())
    # The multi-byte cases really do split characters across tokens (else the test proves little).
    if name in {"japanese", "emoji", "arabic", "hebrew", "mixed"}:
        assert partial, f"no partial-byte token in {name}"
    # Continuation ids still spell exactly the kept text.
    assert dec(continuation_ids(segment, dec, enc)) == segment.text
