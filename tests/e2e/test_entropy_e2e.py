"""Query entropy end to end on the real default model: the estimate, its kind and both bounds
in the trace, multi-byte queries, and completions `top_logprobs` that keep every token.

vLLM on CPU is not bit-stable across requests: every assertion reads ONE response (its trace
against itself, its logprobs against its own tokens), never two.
"""

from __future__ import annotations

import math

import pytest

JAPANESE = "東京タワーの高さは何メートルですか？"


def _self_search(openai_client, model_name: str, question: str) -> dict:
    response = openai_client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        extra_body={"self_search": {"policy": "never"}},
    )
    trace = response.choices[0].model_extra.get("self_search")
    assert trace is not None, "self-search trace missing"
    return trace


def _check_entropy(entropy: dict) -> None:
    n = entropy["tokens"]
    assert n >= 1
    assert entropy["kind"] in ("exact", "topk_gaussian_tail")
    per, lo, hi = entropy["per_token"], entropy["per_token_lower"], entropy["per_token_upper"]
    assert len(per) == len(lo) == len(hi) == n
    for low, value, high in zip(lo, per, hi, strict=True):
        assert 0 <= low <= value <= high <= math.log(50_000) + 1e-6
    # The mean and max aggregates come with their own bounds, from the per-token ones.
    assert entropy["mean"] == pytest.approx(sum(per) / n, abs=1e-5)
    assert entropy["lower"]["mean"] == pytest.approx(sum(lo) / n, abs=1e-5)
    assert entropy["upper"]["mean"] == pytest.approx(sum(hi) / n, abs=1e-5)
    assert entropy["lower"]["mean"] <= entropy["mean"] <= entropy["upper"]["mean"]
    assert entropy["lower"]["max"] <= entropy["max"] <= entropy["upper"]["max"]


@pytest.mark.parametrize("question", ["Who painted the Mona Lisa?", JAPANESE])
def test_trace_reports_estimate_kind_and_bounds(openai_client, model_name, question):
    trace = _self_search(openai_client, model_name, question)
    searches = [s for s in trace["searches"] if s["query"]]
    assert searches, "the model wrote no query"
    for search in searches:
        entropy = search["entropy"]
        _check_entropy(entropy)
        query = search["query"]
        # Every token of the query counts: at least one position per UTF-8 character
        # boundary group a byte-level token can hold (no BPE token holds more than ~16 bytes
        # here), and partial-byte tokens of multi-byte characters are never dropped, so a
        # non-ASCII query cannot report fewer positions than its characters need bytes / 16.
        assert entropy["tokens"] >= math.ceil(len(query.encode()) / 16)


def _japanese_completion(http, headers, model_name: str, **extra) -> dict:
    response = http.post(
        "/v1/completions",
        json={
            "model": model_name,
            "prompt": "日本語の文章: " + JAPANESE,
            "max_tokens": 24,
            "temperature": 0,
            "logprobs": 5,
            **extra,
        },
        headers=headers,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_top_logprobs_keep_every_partial_byte_token(http, auth_headers, model_name):
    body = _japanese_completion(http, auth_headers, model_name)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == body["usage"]["completion_tokens"]
    partial = 0
    for top in logprobs["top_logprobs"]:
        # Five candidates each: none collapsed into another's key (several partial-byte
        # candidates all decode to U+FFFD; they are keyed token_id:N instead).
        assert len(top) == 5
        partial += sum(1 for k in top if k == "\ufffd" or k.startswith("token_id:"))
    # A Japanese continuation does meet partial-byte candidates (else this test proves little).
    assert partial >= 1


def test_completion_return_tokens_as_token_ids(http, auth_headers, model_name):
    body = _japanese_completion(http, auth_headers, model_name, return_tokens_as_token_ids=True)
    logprobs = body["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") for t in logprobs["tokens"])
    for top in logprobs["top_logprobs"]:
        assert len(top) == 5 and all(k.startswith("token_id:") for k in top)
