"""Property-based requests for the routes vLLM's serving layer answers inside ssrl.

tests/unit/test_fuzz_api.py fuzzes ssrl's own routes from its OpenAPI schema over a scripted
engine; vLLM's layer needs the real engine, so these run against a live server: random values
(huge and negative integers, floats, strings with lone surrogates and control characters,
nesting, wrong types) for the fields vLLM's chat, completions, Responses and tokenizer
requests read. Every answer must be a 2xx or a 4xx in OpenAI's error shape: never a 5xx.
Budgets stay small so the engine's share is short.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 25

_ODD_TEXT = st.sampled_from(["", "x", "\ud800", "\x00\x1b[31m", "<tool_call>", "a" * 300, "😀"])
_ODD_NUMBER = st.sampled_from([0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**64), 0.5, 1e308, float("-inf")])
ODD_VALUE: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), _ODD_NUMBER, _ODD_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_ODD_TEXT, inner, max_size=3)),
    max_leaves=6,
)

FIELDS = {
    "/v1/chat/completions": [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "seed",
        "stop",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "tools",
        "tool_choice",
        "response_format",
        "structured_outputs",
        "priority",
        "cache_salt",
        "min_tokens",
        "bad_words",
        "stream",
        "stream_options",
        "messages",
    ],
    "/v1/completions": [
        "temperature",
        "top_k",
        "n",
        "seed",
        "stop",
        "logprobs",
        "echo",
        "suffix",
        "prompt",
        "logit_bias",
        "best_of",
        "min_tokens",
        "stream",
        "prompt_logprobs",
    ],
    "/v1/responses": [
        "input",
        "instructions",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "text",
        "reasoning",
        "store",
        "previous_response_id",
        "max_tool_calls",
        "stream",
    ],
    "/tokenize": ["prompt", "messages", "add_special_tokens", "add_generation_prompt"],
}


def base(path: str, model: str) -> dict[str, Any]:
    """A valid request that vLLM's layer answers (ignore_eos and top_k are refused by ssrl's
    own serving, so `auto` forwards them), with a small budget."""
    if path == "/v1/chat/completions":
        return {
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "ignore_eos": True,
            "self_search": {"enabled": False},
        }
    if path == "/v1/completions":
        return {"model": model, "prompt": "Hi", "max_tokens": 4, "ignore_eos": True}
    if path == "/v1/responses":
        return {"model": model, "input": "Hi", "max_output_tokens": 4}
    return {"model": model, "prompt": "Hi"}


def check_answer(response: httpx.Response, body: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500], body)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}, error


def fuzz_forwarded(client: httpx.Client, model: str, path: str) -> None:
    """Random values for the route's fields, one or two at a time, on a valid base request."""

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.dictionaries(st.sampled_from(FIELDS[path]), ODD_VALUE, min_size=1, max_size=2))
    def one(fields: dict[str, Any]) -> None:
        body = {**base(path, model), **fields}
        # Sent as JSON text with escapes: a lone surrogate cannot be encoded otherwise.
        raw = json.dumps(body, allow_nan=True).encode()
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        check_answer(response, body)

    one()
