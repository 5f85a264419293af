"""The client side of bench/native_client_loop.py: which tokens of a completion are the query."""

from __future__ import annotations

import math

from bench.native_client_loop import _positions


def test_positions_are_the_query_tokens_read_from_the_completion_offsets() -> None:
    # "<search> capital of France </search>" cut at the stop: text ends before `</search>`.
    text = "<search> capital of France "
    tokens = ["<", "search", ">", " capital", " of", " France", " "]
    offsets, at = [], 100  # vLLM's offsets count from the prompt's end; only differences matter
    for token in tokens:
        offsets.append(at)
        at += len(token)
    logprobs = {
        "tokens": tokens,
        "text_offset": offsets,
        "token_logprobs": [math.log(0.9)] * len(tokens),
        "top_logprobs": [{t: math.log(0.9), "x": math.log(0.05)} for t in tokens],
    }
    start = text.rfind("<search>") + len("<search>")
    positions = _positions(logprobs, text, start, len(text))
    # " capital", " of", " France": not the tag's tokens, not the lone space before the close.
    assert len(positions) == 3
    assert all(p.logprob == math.log(0.9) and len(p.top) == 2 for p in positions)
    assert _positions({}, text, start, len(text)) == []
