"""Completions `top_logprobs`: one key per candidate token, even when decoded strings collide."""

from __future__ import annotations

from collections.abc import Sequence

from server.protocol import CompletionRequest
from server.serving_completion import token_id_placeholder, top_logprobs_keyed


def decode(ids: Sequence[int]) -> str:
    # Byte-level: ids >= 1000 are lone bytes of multi-byte characters, which decode to U+FFFD.
    return "".join("\ufffd" if i >= 1000 else chr(ord("a") + i) for i in ids)


def test_partial_byte_candidates_stay_distinct() -> None:
    ranked = [(1000, -0.5), (1001, -1.0), (2, -1.5), (1002, -2.0)]
    got = top_logprobs_keyed(ranked, {}, decode, as_ids=False)
    # vLLM's dict comprehension would keep one "\ufffd" entry out of three.
    assert got == {"token_id:1000": -0.5, "token_id:1001": -1.0, "c": -1.5, "token_id:1002": -2.0}
    assert list(got) == ["token_id:1000", "token_id:1001", "c", "token_id:1002"]  # best first


def test_unique_strings_keep_vllms_decoded_keys() -> None:
    ranked = [(0, -0.1), (1000, -2.0)]
    # The engine's decoded text wins over decoding again; a lone U+FFFD is unique, kept as is.
    assert top_logprobs_keyed(ranked, {0: " Paris"}, decode, as_ids=False) == {" Paris": -0.1, "\ufffd": -2.0}


def test_return_tokens_as_token_ids_mirrors_vllm() -> None:
    ranked = [(5, -0.1), (1000, -2.0)]
    assert top_logprobs_keyed(ranked, {}, decode, as_ids=True) == {"token_id:5": -0.1, "token_id:1000": -2.0}
    assert token_id_placeholder(7) == "token_id:7"
    request = CompletionRequest(model="m", prompt="x", logprobs=2, return_tokens_as_token_ids=True)
    assert request.return_tokens_as_token_ids is True
    assert CompletionRequest(model="m", prompt="x").return_tokens_as_token_ids is False
