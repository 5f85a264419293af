"""The OpenAI surface of a real `ssrl serve` (vLLM, embedded default model), through the
official `openai` SDK and raw HTTP.

Generations stay short and greedy where the text matters, so the file runs in a few minutes
on two CPU cores. Chat requests turn self-search off (`PLAIN`): this file covers plain
generation; the self-search loop has its own tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MAX_MODEL_LEN, MAX_REQUEST_BYTES, RunningServer

PLAIN: dict[str, Any] = {"self_search": {"enabled": False}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
COMPLETION_PROMPT = "The capital of France is"
COUNTING_PROMPT = "Count from 1 to 1000: 1, 2, 3, 4,"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# ----- helpers -----------------------------------------------------------------------------


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics, keyed by (name, labels)."""
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def poll(condition: Callable[[], bool], timeout: float = 20.0, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def assert_error_shape(
    response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def sse_data(lines: list[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line]


@pytest.fixture(scope="module")
def greedy_answer(openai_client: openai.OpenAI, model_name: str):
    """A temperature-0 chat answer to QUESTION, the reference several tests compare with."""
    return openai_client.chat.completions.create(
        model=model_name, messages=QUESTION, max_tokens=16, temperature=0, extra_body=PLAIN
    )


@pytest.fixture(scope="module")
def greedy_completion(openai_client: openai.OpenAI, model_name: str):
    return openai_client.completions.create(
        model=model_name, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0
    )


# ----- chat --------------------------------------------------------------------------------


def test_chat_completion(greedy_answer, model_name: str) -> None:
    response = greedy_answer
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == model_name
    [choice] = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 16
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens


def test_a_repeated_request_reads_the_same_prompt(openai_client, model_name, greedy_answer) -> None:
    # vLLM on CPU is not bit-stable across requests (the same greedy request can answer
    # differently), so only what the template fixes is compared: the prompt.
    again = openai_client.chat.completions.create(
        model=model_name, messages=QUESTION, max_tokens=16, temperature=0, extra_body=PLAIN
    )
    assert again.usage.prompt_tokens == greedy_answer.usage.prompt_tokens
    assert 0 < again.usage.completion_tokens <= 16
    assert again.usage.total_tokens == again.usage.prompt_tokens + again.usage.completion_tokens


def test_max_completion_tokens(openai_client, model_name) -> None:
    response = openai_client.chat.completions.create(
        model=model_name,
        messages=QUESTION,
        max_completion_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        extra_body=PLAIN,
    )
    [choice] = response.choices
    # An answer to this question is longer than 3 tokens, so the cap cuts it; the content is
    # exactly the 3 tokens the same response lists.
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 3
    tokens = [entry.token for entry in choice.logprobs.content]
    assert len(tokens) == 3 and "".join(tokens) == choice.message.content


def test_n_two_choices(openai_client, model_name) -> None:
    response = openai_client.chat.completions.create(
        model=model_name,
        messages=POEM,
        n=2,
        max_tokens=12,
        temperature=1,
        seed=3,
        extra_body=PLAIN,
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
    assert len(response.choices) <= response.usage.completion_tokens <= 2 * 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_stop_word_cuts_the_answer_before_it(openai_client, model_name) -> None:
    # A stop string every sentence-long answer contains (a space), so the cut is certain
    # whatever words the model picks; no other request is compared with this one.
    response = openai_client.chat.completions.create(
        model=model_name,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stop=[" "],
        extra_body=PLAIN,
    )
    [choice] = response.choices
    assert " " not in choice.message.content
    assert choice.finish_reason == "stop"
    assert response.usage.completion_tokens < 16


def test_newline_stop(openai_client, model_name) -> None:
    messages = [{"role": "user", "content": "List three fruits, one per line."}]
    stopped = openai_client.chat.completions.create(
        model=model_name,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stop="\n",
        extra_body=PLAIN,
    ).choices[0]
    # One response only: the stop string never reaches the content, and a list of three
    # lines cannot fit before it, so the newline (or the end of the answer) stopped it.
    assert "\n" not in stopped.message.content
    assert stopped.finish_reason in ("stop", "length")


def test_seeded_sampling(openai_client, model_name) -> None:
    # Same-seed reproducibility cannot be asserted here: vLLM on CPU is not bit-stable
    # across requests. The seed's plumbing into SamplingParams is unit-tested; here one
    # seeded, sampled response must be well-formed and describe itself consistently.
    response = openai_client.chat.completions.create(
        model=model_name,
        messages=POEM,
        max_tokens=16,
        temperature=1,
        seed=1234,
        logprobs=True,
        top_logprobs=1,
        extra_body=PLAIN,
    )
    [choice] = response.choices
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens <= 16
    tokens = "".join(entry.token for entry in content)
    assert tokens.startswith(choice.message.content)
    assert all(entry.logprob <= 0 for entry in content)


def test_logprobs_and_top_logprobs(openai_client, model_name) -> None:
    response = openai_client.chat.completions.create(
        model=model_name,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=PLAIN,
    )
    [choice] = response.choices
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    tokens = [entry.token for entry in content]
    if "".join(tokens) != choice.message.content:
        # As in vLLM's server, the end-of-sequence token that ended the answer is listed
        # (and counted) though its text is not part of the content.
        assert choice.finish_reason == "stop"
        assert "".join(tokens[:-1]) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        top = entry.top_logprobs
        assert len(top) == 3
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        # Greedy decoding picks a most likely token.
        assert entry.logprob == pytest.approx(values[0], abs=1e-4)


def test_streaming_chat_is_one_well_formed_answer(openai_client, model_name, greedy_answer) -> None:
    stream = openai_client.chat.completions.create(
        model=model_name,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=PLAIN,
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    # Generated text is compared with nothing from another request (vLLM on CPU is not
    # bit-stable across requests); the prompt, fixed by the template, is.
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces).strip()
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    usage = usage_chunk.usage
    assert usage is not None
    assert usage.prompt_tokens == greedy_answer.usage.prompt_tokens
    # Every text delta carries at least one new token.
    assert len(pieces) <= usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_raw_sse_stream(http: httpx.Client, server: RunningServer, model_name: str) -> None:
    payload = {
        "model": model_name,
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        **PLAIN,
    }
    with http.stream("POST", CHAT, json=payload, headers=server.auth_headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines, "empty stream"
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(data) for data in sse_data(lines[:-1])]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)


def test_concurrent_chats(async_openai_client: openai.AsyncOpenAI, model_name: str) -> None:
    async def main() -> list[Any]:
        async with async_openai_client as client:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=model_name,
                        messages=[{"role": "user", "content": f"Say the number {i}."}],
                        max_tokens=8,
                        temperature=0,
                        extra_body=PLAIN,
                    )
                    for i in range(3)
                )
            )

    for response in asyncio.run(main()):
        assert response.choices[0].message.content
        assert 0 < response.usage.completion_tokens <= 8


# ----- completions -------------------------------------------------------------------------


def test_completion(greedy_completion, model_name) -> None:
    response = greedy_completion
    assert response.object == "text_completion"
    assert response.model == model_name
    [choice] = response.choices
    assert choice.index == 0
    assert isinstance(choice.text, str) and choice.text
    assert choice.finish_reason in ("stop", "length")
    assert 0 < response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completion_stream_is_well_formed(openai_client, model_name, greedy_completion) -> None:
    chunks = list(
        openai_client.completions.create(
            model=model_name,
            prompt=COMPLETION_PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # One stream, checked against itself; only the prompt is compared with another request.
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens == greedy_completion.usage.prompt_tokens
    assert len(pieces) <= usage.completion_tokens <= 8
    if finishes == ["length"]:
        assert usage.completion_tokens == 8


def test_completion_echo(openai_client, model_name, greedy_completion) -> None:
    response = openai_client.completions.create(
        model=model_name, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0, echo=True
    )
    # The echoed prompt, then exactly the tokens this response generated (no other request's
    # text is compared: vLLM on CPU is not bit-stable across requests).
    [choice] = response.choices
    assert choice.text.startswith(COMPLETION_PROMPT)
    assert response.usage.prompt_tokens == greedy_completion.usage.prompt_tokens
    assert 0 < response.usage.completion_tokens <= 8


def test_completion_logprobs(openai_client, model_name) -> None:
    response = openai_client.completions.create(
        model=model_name, prompt=COMPLETION_PROMPT, max_tokens=6, temperature=0, logprobs=2
    )
    [choice] = response.choices
    logprobs = choice.logprobs
    n = response.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    assert "".join(logprobs.tokens) == choice.text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    for top in logprobs.top_logprobs:
        assert 1 <= len(top) <= 2
        assert all(v <= 0 for v in top.values())
    # Offsets point at each token in the text.
    assert logprobs.text_offset[0] == 0
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert choice.text[offset : offset + len(token)] == token


def test_completion_stop(openai_client, model_name) -> None:
    response = openai_client.completions.create(
        model=model_name, prompt=COUNTING_PROMPT, max_tokens=16, temperature=0, stop=[","]
    )
    [choice] = response.choices
    assert choice.text.strip() and "," not in choice.text
    assert choice.finish_reason == "stop"


def test_completion_prompt_list(openai_client, model_name, greedy_completion) -> None:
    counting = openai_client.completions.create(
        model=model_name, prompt=COUNTING_PROMPT, max_tokens=4, temperature=0
    )
    response = openai_client.completions.create(
        model=model_name, prompt=[COMPLETION_PROMPT, COUNTING_PROMPT], max_tokens=4, temperature=0
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.text for c in response.choices)
    assert response.usage.prompt_tokens == (
        greedy_completion.usage.prompt_tokens + counting.usage.prompt_tokens
    )
    assert response.usage.completion_tokens <= 8


def test_completion_token_id_prompts(openai_client, model_name) -> None:
    response = openai_client.completions.create(
        model=model_name, prompt=[504, 3458, 282, 4649], max_tokens=4, temperature=0, echo=True
    )
    assert response.usage.prompt_tokens == 4
    assert response.choices[0].text
    batch = openai_client.completions.create(
        model=model_name, prompt=[[504, 3458], [282, 4649, 314]], max_tokens=2, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.prompt_tokens == 5


def test_completion_token_id_out_of_vocab(http, server, model_name) -> None:
    response = http.post(
        COMPLETIONS,
        headers=server.auth_headers,
        json={"model": model_name, "prompt": [1, 10**8], "max_tokens": 2},
    )
    assert_error_shape(response, 400, param="prompt")


# ----- models, health, metrics -------------------------------------------------------------


def test_models(openai_client, model_name) -> None:
    models = openai_client.models.list().data
    # The embedded model first (what clients that take "the first model" get), then the
    # native adapter served beside it, as vLLM lists LoRA adapters after their base.
    assert [m.id for m in models] == [model_name, "smollm2-135m-ssrl"]
    assert all(m.object == "model" for m in models)
    card = openai_client.models.retrieve(model_name)
    assert card.id == model_name
    assert card.model_extra.get("max_model_len") == MAX_MODEL_LEN


def test_unknown_model_card_is_404(openai_client, http, server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    response = http.get("/v1/models/no-such-model", headers=server.auth_headers)
    assert_error_shape(response, 404, code="model_not_found", param="model")


def test_health_needs_no_key(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_metrics_need_no_key_and_name_the_families(http: httpx.Client) -> None:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "ssrl_requests_total",
        "ssrl_time_to_first_token_seconds",
        "ssrl_prompt_tokens_total",
        "ssrl_completion_tokens_total",
        "ssrl_requests_in_flight",
        "vllm:num_requests_running",
        "vllm:generation_tokens_total",
    ):
        assert name in response.text, name


def test_metrics_counters_increase(http, openai_client, model_name) -> None:
    ok = {"route": CHAT, "method": "POST", "status": "200"}
    before = scrape(http)
    response = openai_client.chat.completions.create(
        model=model_name, messages=QUESTION, max_tokens=4, temperature=0, extra_body=PLAIN
    )

    def increased() -> bool:
        now = scrape(http)
        return (
            metric(now, "ssrl_requests_total", **ok) >= metric(before, "ssrl_requests_total", **ok) + 1
            and metric(now, "ssrl_prompt_tokens_total", route=CHAT)
            >= metric(before, "ssrl_prompt_tokens_total", route=CHAT) + response.usage.prompt_tokens
            and metric(now, "ssrl_completion_tokens_total", route=CHAT)
            >= metric(before, "ssrl_completion_tokens_total", route=CHAT) + response.usage.completion_tokens
            and metric(now, "ssrl_time_to_first_token_seconds_count", route=CHAT)
            >= metric(before, "ssrl_time_to_first_token_seconds_count", route=CHAT) + 1
            and metric(now, "vllm:generation_tokens_total")
            >= metric(before, "vllm:generation_tokens_total") + response.usage.completion_tokens
        )

    assert poll(increased, timeout=15), "metrics did not increase"
    assert metric(scrape(http), "ssrl_requests_in_flight", route=CHAT) == 0


# ----- auth --------------------------------------------------------------------------------


def test_missing_key_is_401(http: httpx.Client, model_name: str) -> None:
    response = http.post(CHAT, json={"model": model_name, "messages": QUESTION, **PLAIN})
    error = assert_error_shape(response, 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert_error_shape(http.get("/v1/models"), 401)


def test_wrong_key_is_401(http: httpx.Client, server: RunningServer, model_name: str) -> None:
    response = http.get("/v1/models", headers={"Authorization": "Bearer wrong-key"})
    assert_error_shape(response, 401, code="invalid_api_key")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=2, extra_body=PLAIN)
    client.close()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


# ----- errors ------------------------------------------------------------------------------


def _chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": QUESTION, **PLAIN, **fields}


ERROR_CASES: list[tuple[str, Callable[[str], Any], int, str | None, str | None]] = [
    ("malformed_json", lambda m: b'{"model": "x", "messages": [', 400, "invalid_json", None),
    ("missing_messages", lambda m: {"model": m, **PLAIN}, 400, "missing_required_parameter", "messages"),
    ("unknown_model", lambda m: _chat("no-such-model"), 404, "model_not_found", "model"),
    (
        "max_tokens_beyond_context",
        lambda m: _chat(m, max_tokens=MAX_MODEL_LEN + 1000),
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    ("negative_temperature", lambda m: _chat(m, temperature=-1), 400, None, "temperature"),
    (
        "prompt_beyond_context",
        lambda m: _chat(
            m, messages=[{"role": "user", "content": "hello " * (MAX_MODEL_LEN + 100)}], max_tokens=8
        ),
        400,
        "context_length_exceeded",
        "messages",
    ),
    ("messages_wrong_type", lambda m: {"model": m, "messages": "x", **PLAIN}, 400, None, "messages"),
    ("top_logprobs_above_max", lambda m: _chat(m, logprobs=True, top_logprobs=21), 400, None, "top_logprobs"),
    (
        "stream_options_without_stream",
        lambda m: _chat(m, stream_options={"include_usage": True}),
        400,
        None,
        None,
    ),
    ("empty_messages", lambda m: {"model": m, "messages": [], **PLAIN}, 400, None, "messages"),
]


@pytest.mark.parametrize(
    ("case", "payload", "status", "code", "param"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_chat_errors(http, server, model_name, case, payload, status, code, param) -> None:
    body = payload(model_name)
    if isinstance(body, bytes):
        response = http.post(
            CHAT, content=body, headers={**server.auth_headers, "content-type": "application/json"}
        )
    else:
        response = http.post(CHAT, json=body, headers=server.auth_headers)
    assert_error_shape(response, status, code=code, param=param)


def test_body_over_the_size_limit_is_413(http, server, model_name) -> None:
    body = json.dumps(
        _chat(model_name, messages=[{"role": "user", "content": "x" * int(MAX_REQUEST_BYTES * 1.5)}])
    ).encode()
    assert len(body) > MAX_REQUEST_BYTES
    response = http.post(
        CHAT, content=body, headers={**server.auth_headers, "content-type": "application/json"}
    )
    assert_error_shape(response, 413, code="request_too_large")


def test_unknown_route_is_a_json_404(http, server) -> None:
    assert_error_shape(http.get("/v1/no-such-route", headers=server.auth_headers), 404)
    assert_error_shape(http.get("/no-such-route", headers=server.auth_headers), 404)
    # Without the key every path but the probes is a 401, so paths cannot be probed.
    assert_error_shape(http.get("/no-such-route"), 401)


def test_completion_errors(http, server, model_name) -> None:
    headers = server.auth_headers
    long_prompt = {"model": model_name, "prompt": "hello " * (MAX_MODEL_LEN + 100), "max_tokens": 4}
    assert_error_shape(
        http.post(COMPLETIONS, json=long_prompt, headers=headers), 400, code="context_length_exceeded"
    )
    too_many = {"model": model_name, "prompt": "x", "logprobs": 21}
    assert_error_shape(http.post(COMPLETIONS, json=too_many, headers=headers), 400, param="logprobs")
    unknown = {"model": "no-such-model", "prompt": "x"}
    assert_error_shape(http.post(COMPLETIONS, json=unknown, headers=headers), 404, code="model_not_found")


def test_sdk_raises_bad_request_for_context_length(openai_client, model_name) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=model_name, messages=QUESTION, max_tokens=MAX_MODEL_LEN * 2, extra_body=PLAIN
        )
    assert caught.value.code == "context_length_exceeded"


# ----- client disconnects abort the engine request -----------------------------------------


def _aborted_and_idle(http: httpx.Client, aborts_before: float) -> Callable[[], bool]:
    def check() -> bool:
        now = scrape(http)
        return (
            metric(now, "ssrl_engine_aborts_total", route=COMPLETIONS) >= aborts_before + 1
            and metric(now, "vllm:num_requests_running") == 0
        )

    return check


def _long_completion(model_name: str, stream: bool) -> dict[str, Any]:
    return {
        "model": model_name,
        "prompt": COUNTING_PROMPT,
        "max_tokens": 1500,
        "temperature": 0,
        "stream": stream,
    }


def test_stream_disconnect_aborts_the_engine_request(http, server, model_name) -> None:
    aborts_before = metric(scrape(http), "ssrl_engine_aborts_total", route=COMPLETIONS)
    with (
        httpx.Client(base_url=server.base_url, headers=server.auth_headers, timeout=60) as client,
        client.stream("POST", COMPLETIONS, json=_long_completion(model_name, True)) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the stream ended before the disconnect"
                seen += 1
            if seen >= 3:
                break
    assert seen >= 3
    assert poll(_aborted_and_idle(http, aborts_before), timeout=20), (
        "the engine request was not aborted after the client left",
        server.log_tail(20),
    )


def test_non_stream_disconnect_aborts_the_engine_request(http, server, model_name) -> None:
    aborts_before = metric(scrape(http), "ssrl_engine_aborts_total", route=COMPLETIONS)
    with (
        httpx.Client(
            base_url=server.base_url, headers=server.auth_headers, timeout=httpx.Timeout(60, read=1.5)
        ) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(COMPLETIONS, json=_long_completion(model_name, False))
    assert poll(_aborted_and_idle(http, aborts_before), timeout=20), (
        "the engine request was not aborted after the client left",
        server.log_tail(20),
    )
