"""Parity with vLLM's own OpenAI server for every request that does not self-search.

A differential conformance suite. Each case is one request shape (every tool-choice kind, both
response formats, structured outputs, each sampling parameter in and out of range, stop, n,
logprobs, streaming, /v1/responses, /tokenize, /detokenize, /version, malformed values).

- The ssrl half (normal suite): the case goes to an ssrl server started with
  `--openai-serving vllm` (chat with `self_search: {enabled: false}`), and its status, its
  response's shape and its error `param` must match what vLLM's server answered when the
  expectations were recorded (`EXPECTED`, from vLLM 0.32 on the default model).
- The reference half (`SSRL_PARITY=1`, starts vLLM's own `python -m
  vllm.entrypoints.openai.api_server` on the same checkpoint, ~1-2 min): the case goes to
  both servers and the two answers must agree field by field (ids, timestamps and
  fingerprints aside; greedy text is not bit-stable on vLLM CPU, so text is compared only
  where a single answer is valid by construction: a one-option structured choice, forced
  tool names).

Also: self-search requests carrying a field the loop cannot honour answer 400 naming it, and
openai-agents' `OpenAIResponsesModel` completes a run with a forced function tool.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from router.engine.default_model import DEFAULT_MODEL_NAME, ensure_default_checkpoint
from server.errors import openai_error_payload
from tests.conftest import (
    API_KEY,
    ENV,
    MAX_MODEL_LEN,
    RunningServer,
    _free_port,
    _start,
    _stop,
    _wait_healthy,
    start_router,
)
from tests.e2e.forwarded_fuzz import FIELDS as FUZZED_FIELDS
from tests.e2e.forwarded_fuzz import fuzz_forwarded

pytestmark = pytest.mark.engine

M = DEFAULT_MODEL_NAME
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OFF = {"self_search": {"enabled": False}}
TOOL_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]

USER = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": M, "messages": USER, "max_tokens": 8, "temperature": 0, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": M, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, **fields}


# id -> (method, path, body). Chat bodies go to ssrl with self_search off added.
CASES: dict[str, tuple[str, str, Any]] = {
    # sampling parameters, in range
    "chat_plain": ("POST", CHAT, chat()),
    "chat_n2": ("POST", CHAT, chat(n=2, temperature=0.8, seed=7)),
    "chat_stop": ("POST", CHAT, chat(stop=["\n", "Paris"])),
    "chat_logprobs": ("POST", CHAT, chat(logprobs=True, top_logprobs=3)),
    "chat_top_k_min_p": ("POST", CHAT, chat(temperature=0.7, top_k=5, min_p=0.1, seed=1)),
    "chat_penalties": (
        "POST",
        CHAT,
        chat(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2),
    ),
    "chat_logit_bias": ("POST", CHAT, chat(logit_bias={"19556": 5})),
    "chat_min_tokens_ignore_eos": ("POST", CHAT, chat(min_tokens=4, ignore_eos=True)),
    "chat_bad_words": ("POST", CHAT, chat(bad_words=["Paris"])),
    "chat_template_kwargs": ("POST", CHAT, chat(chat_template_kwargs={"enable_thinking": False})),
    "chat_continue_final": (
        "POST",
        CHAT,
        chat(
            messages=[*USER, {"role": "assistant", "content": "The capital is"}],
            continue_final_message=True,
            add_generation_prompt=False,
        ),
    ),
    "chat_prompt_logprobs": ("POST", CHAT, chat(prompt_logprobs=1)),
    "chat_echo": ("POST", CHAT, chat(echo=True)),
    # sampling parameters, out of range or malformed
    "chat_temperature_bad": ("POST", CHAT, chat(temperature=-1)),
    "chat_top_p_bad": ("POST", CHAT, chat(top_p=1.5)),
    "chat_top_k_bad": ("POST", CHAT, chat(top_k=-5)),
    "chat_min_p_bad": ("POST", CHAT, chat(min_p=2)),
    "chat_presence_bad": ("POST", CHAT, chat(presence_penalty=5.0)),
    "chat_frequency_bad": ("POST", CHAT, chat(frequency_penalty=-3)),
    "chat_repetition_bad": ("POST", CHAT, chat(repetition_penalty=0)),
    "chat_top_logprobs_bad": ("POST", CHAT, chat(logprobs=True, top_logprobs=30)),
    "chat_n_bad": ("POST", CHAT, chat(n=0)),
    "chat_max_tokens_bad": ("POST", CHAT, chat(max_tokens=0)),
    "chat_beyond_context": ("POST", CHAT, chat(max_tokens=MAX_MODEL_LEN + 100)),
    "chat_messages_bad": ("POST", CHAT, {"model": M, "messages": "hello"}),
    "chat_unknown_model": ("POST", CHAT, chat(model="no-such-model")),
    # response formats and structured outputs
    "chat_json_object": ("POST", CHAT, chat(response_format={"type": "json_object"}, max_tokens=16)),
    "chat_json_schema": ("POST", CHAT, chat(response_format=SCHEMA, max_tokens=24)),
    "chat_response_format_bad": ("POST", CHAT, chat(response_format={"type": "bogus"})),
    "chat_structured_choice": ("POST", CHAT, chat(structured_outputs={"choice": ["Paris"]})),
    "chat_structured_regex": ("POST", CHAT, chat(structured_outputs={"regex": "[A-Z][a-z]{2,5}"})),
    # tools
    "chat_tools_auto": ("POST", CHAT, chat(tools=[WEATHER], tool_choice="auto")),
    "chat_tools_none": ("POST", CHAT, chat(tools=[WEATHER], tool_choice="none")),
    "chat_tools_required": ("POST", CHAT, chat(tools=[WEATHER], tool_choice="required", max_tokens=200)),
    "chat_tools_named": ("POST", CHAT, chat(tools=[WEATHER], tool_choice=NAMED, max_tokens=200)),
    "chat_tools_named_parallel_off": (
        "POST",
        CHAT,
        chat(tools=[WEATHER], tool_choice=NAMED, parallel_tool_calls=False, max_tokens=200),
    ),
    "chat_tool_choice_without_tools": ("POST", CHAT, chat(tool_choice=NAMED)),
    # streaming
    "chat_stream": ("POST", CHAT, chat(stream=True, stream_options={"include_usage": True})),
    "chat_stream_named_tool": (
        "POST",
        CHAT,
        chat(stream=True, tools=[WEATHER], tool_choice=NAMED, max_tokens=200),
    ),
    # completions
    "completion_plain": ("POST", COMPLETIONS, completion()),
    "completion_echo_logprobs": ("POST", COMPLETIONS, completion(echo=True, logprobs=2)),
    "completion_stream": (
        "POST",
        COMPLETIONS,
        completion(stream=True, stream_options={"include_usage": True}),
    ),
    "completion_penalty_bad": ("POST", COMPLETIONS, completion(frequency_penalty=5.0)),
    "completion_logprobs_bad": ("POST", COMPLETIONS, completion(logprobs=30)),
    "completion_structured_choice": (
        "POST",
        COMPLETIONS,
        completion(structured_outputs={"choice": ["Paris"]}),
    ),
    # responses
    "responses_plain": (
        "POST",
        "/v1/responses",
        {"model": M, "input": "Hi", "max_output_tokens": 8, "temperature": 0},
    ),
    "responses_stream": (
        "POST",
        "/v1/responses",
        {"model": M, "input": "Hi", "max_output_tokens": 8, "temperature": 0, "stream": True},
    ),
    "responses_bad": ("POST", "/v1/responses", {"model": M, "input": "Hi", "temperature": -3}),
    # tokenizer routes and version
    "tokenize_prompt": ("POST", "/tokenize", {"model": M, "prompt": "Hello world"}),
    "tokenize_messages": ("POST", "/tokenize", {"model": M, "messages": USER}),
    "detokenize": ("POST", "/detokenize", {"model": M, "tokens": [19556, 905]}),
    "detokenize_bad": ("POST", "/detokenize", {"model": M, "tokens": "x"}),
    "version": ("GET", "/version", None),
}

# Top-level keys of vLLM's answers (of every event, for streams).
ERROR_KEYS = ("error",)
CHAT_KEYS = (
    "choices",
    "created",
    "ec_transfer_params",
    "id",
    "kv_transfer_params",
    "metrics",
    "model",
    "object",
    "prompt_logprobs",
    "prompt_text",
    "prompt_token_ids",
    "service_tier",
    "system_fingerprint",
    "usage",
)
CHAT_STREAM_KEYS = (
    "choices",
    "created",
    "id",
    "model",
    "object",
    "prompt_text",
    "prompt_token_ids",
    "system_fingerprint",
    "usage",
)
CHAT_STREAM_TOOL_KEYS = (
    "choices",
    "created",
    "id",
    "model",
    "object",
    "prompt_text",
    "prompt_token_ids",
    "system_fingerprint",
)
COMPLETION_KEYS = (
    "choices",
    "created",
    "ec_transfer_params",
    "id",
    "kv_transfer_params",
    "metrics",
    "model",
    "object",
    "service_tier",
    "system_fingerprint",
    "usage",
)
COMPLETION_STREAM_KEYS = ("choices", "created", "id", "model", "object", "system_fingerprint", "usage")
RESPONSES_KEYS = (
    "background",
    "created_at",
    "ec_transfer_params",
    "frequency_penalty",
    "id",
    "incomplete_details",
    "input_messages",
    "instructions",
    "kv_transfer_params",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "model",
    "object",
    "output",
    "output_messages",
    "parallel_tool_calls",
    "presence_penalty",
    "previous_response_id",
    "prompt",
    "reasoning",
    "service_tier",
    "status",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "truncation",
    "usage",
    "user",
)
RESPONSES_STREAM_KEYS = (
    "content_index",
    "delta",
    "event",
    "item",
    "item_id",
    "logprobs",
    "output_index",
    "part",
    "response",
    "sequence_number",
    "text",
    "type",
)
TOKENIZE_KEYS = ("count", "max_model_len", "token_strs", "tokens")
DETOKENIZE_KEYS = ("prompt",)
VERSION_KEYS = ("version",)

# What vLLM 0.32's own server answered, per case: status, error `param`, top-level keys
# (recorded from the reference server; `SSRL_PARITY=1` checks the cases against it live).
EXPECTED: dict[str, tuple[int, str | None, tuple[str, ...]]] = {
    "chat_plain": (200, None, CHAT_KEYS),
    "chat_n2": (200, None, CHAT_KEYS),
    "chat_stop": (200, None, CHAT_KEYS),
    "chat_logprobs": (200, None, CHAT_KEYS),
    "chat_top_k_min_p": (200, None, CHAT_KEYS),
    "chat_penalties": (200, None, CHAT_KEYS),
    "chat_logit_bias": (200, None, CHAT_KEYS),
    "chat_min_tokens_ignore_eos": (200, None, CHAT_KEYS),
    "chat_bad_words": (200, None, CHAT_KEYS),
    "chat_template_kwargs": (200, None, CHAT_KEYS),
    "chat_continue_final": (200, None, CHAT_KEYS),
    "chat_prompt_logprobs": (200, None, CHAT_KEYS),
    "chat_echo": (200, None, CHAT_KEYS),
    "chat_temperature_bad": (400, "temperature", ERROR_KEYS),
    "chat_top_p_bad": (400, "top_p", ERROR_KEYS),
    "chat_top_k_bad": (400, None, ERROR_KEYS),
    "chat_min_p_bad": (400, None, ERROR_KEYS),
    "chat_presence_bad": (400, None, ERROR_KEYS),
    "chat_frequency_bad": (400, None, ERROR_KEYS),
    "chat_repetition_bad": (400, None, ERROR_KEYS),
    "chat_top_logprobs_bad": (400, "logprobs", ERROR_KEYS),
    "chat_n_bad": (400, None, ERROR_KEYS),
    "chat_max_tokens_bad": (400, "max_tokens", ERROR_KEYS),
    "chat_beyond_context": (400, "max_tokens", ERROR_KEYS),
    "chat_messages_bad": (400, "body.messages", ERROR_KEYS),
    "chat_unknown_model": (404, "model", ERROR_KEYS),
    "chat_json_object": (200, None, CHAT_KEYS),
    "chat_json_schema": (200, None, CHAT_KEYS),
    "chat_response_format_bad": (400, "body.response_format.type", ERROR_KEYS),
    "chat_structured_choice": (200, None, CHAT_KEYS),
    "chat_structured_regex": (200, None, CHAT_KEYS),
    "chat_tools_auto": (200, None, CHAT_KEYS),
    "chat_tools_none": (200, None, CHAT_KEYS),
    "chat_tools_required": (200, None, CHAT_KEYS),
    "chat_tools_named": (200, None, CHAT_KEYS),
    "chat_tools_named_parallel_off": (200, None, CHAT_KEYS),
    "chat_tool_choice_without_tools": (400, "tool_choice", ERROR_KEYS),
    "chat_stream": (200, None, CHAT_STREAM_KEYS),
    "chat_stream_named_tool": (200, None, CHAT_STREAM_TOOL_KEYS),
    "completion_plain": (200, None, COMPLETION_KEYS),
    "completion_echo_logprobs": (200, None, COMPLETION_KEYS),
    "completion_stream": (200, None, COMPLETION_STREAM_KEYS),
    "completion_penalty_bad": (400, None, ERROR_KEYS),
    "completion_logprobs_bad": (400, "logprobs", ERROR_KEYS),
    "completion_structured_choice": (200, None, COMPLETION_KEYS),
    "responses_plain": (200, None, RESPONSES_KEYS),
    "responses_stream": (200, None, RESPONSES_STREAM_KEYS),
    "responses_bad": (400, "temperature", ERROR_KEYS),
    "tokenize_prompt": (200, None, TOKENIZE_KEYS),
    "tokenize_messages": (200, None, TOKENIZE_KEYS),
    "detokenize": (200, None, DETOKENIZE_KEYS),
    "detokenize_bad": (400, "body.tokens", ERROR_KEYS),
    "version": (200, None, VERSION_KEYS),
}


# ----- shapes ------------------------------------------------------------------------------

_VOLATILE = {"id", "created", "created_at", "system_fingerprint", "response_id", "item_id"}


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not values; lists by their first item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return value if value is None else "bool"
    if isinstance(value, int | float):
        return "number"
    return "str"


class Answer:
    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.stream = response.headers.get("content-type", "").startswith("text/event-stream")
        self.events: list[Any] = []
        self.body: Any = None
        if self.stream:
            for line in response.text.splitlines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                elif line.startswith("event: "):
                    self.events.append({"event": line[len("event: ") :]})
        else:
            self.body = response.json()

    @property
    def param(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            value = self.body["error"].get("param")
            return value if isinstance(value, str) else None
        return None

    def shape(self) -> Any:
        if self.stream:
            # The set of distinct event shapes, and how the stream ends.
            shapes = {json.dumps(shape(e), sort_keys=True) for e in self.events if e != "[DONE]"}
            return {"events": sorted(shapes), "done": self.events[-1:] == ["[DONE]"]}
        return shape(self.body)


def send(client: httpx.Client, method: str, path: str, body: Any, *, ssrl: bool) -> Answer:
    if ssrl and path == CHAT and isinstance(body, dict):
        body = {**body, **OFF}
    response = client.request(method, path, json=body) if body is not None else client.request(method, path)
    return Answer(response)


def _server_argv(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clients.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--api-key",
        API_KEY,
        "--openai-serving",
        "vllm",
        *TOOL_FLAGS,
    ]


@pytest.fixture(scope="module")
def parity_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """ssrl with vLLM's serving layer for requests that do not self-search (self-search on by default)."""
    external = os.environ.get("SSRL_PARITY_BASE_URL")
    if external:
        yield RunningServer(external.rstrip("/"), os.environ.get("SSRL_TEST_API_KEY", API_KEY), None, None)
        return
    port = _free_port()
    log = tmp_path_factory.mktemp("ssrl-parity") / "server.log"
    process = _start(_server_argv(port), log, ENV)
    running = RunningServer(f"http://127.0.0.1:{port}", API_KEY, log, process)
    try:
        _wait_healthy(running, 420)
        yield running
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def ssrl(parity_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=parity_server.base_url, headers=parity_server.auth_headers, timeout=180) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """vLLM's own OpenAI server on the same checkpoint, served under the same name."""
    if os.environ.get("SSRL_PARITY", "0") in ("", "0") and not os.environ.get("SSRL_PARITY_RECORD"):
        pytest.skip("the vLLM reference server runs with SSRL_PARITY=1")
    external = os.environ.get("SSRL_PARITY_REFERENCE_URL")
    if external:
        with httpx.Client(base_url=external.rstrip("/"), timeout=180) as c:
            yield c
        return
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-parity") / "vllm.log"
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(ensure_default_checkpoint()),
        "--served-model-name",
        M,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        *TOOL_FLAGS,
    ]
    process = _start(argv, log, ENV)
    running = RunningServer(f"http://127.0.0.1:{port}", "", log, process)
    try:
        _wait_healthy(running, 420)
        with httpx.Client(base_url=running.base_url, timeout=180) as c:
            yield c
    finally:
        _stop(process)


# ----- the ssrl half: against the recorded answers of vLLM's server -------------------------


def _keys(answer: Answer) -> tuple[str, ...]:
    if answer.stream:
        return tuple(sorted({k for e in answer.events if isinstance(e, dict) for k in e}))
    return tuple(sorted(answer.body)) if isinstance(answer.body, dict) else ()


def test_every_case_has_an_expectation() -> None:
    assert set(CASES) == set(EXPECTED)


@pytest.mark.parametrize("name", list(CASES))
def test_case_answers_as_vllm_did(ssrl: httpx.Client, name: str) -> None:
    method, path, body = CASES[name]
    status, param, keys = EXPECTED[name]
    answer = send(ssrl, method, path, body, ssrl=True)
    assert (answer.status, answer.param) == (status, param), answer.body or answer.events[:3]
    assert _keys(answer) == keys
    if status != 200:
        error = answer.body["error"]
        assert set(error) >= {"message", "type", "param", "code"}, error
    if answer.stream and path != "/v1/responses":  # Responses streams end with an event, not [DONE]
        assert answer.events[-1] == "[DONE]"


def test_chat_stream_chunks_carry_null_finish_reasons(ssrl: httpx.Client) -> None:
    answer = send(ssrl, *CASES["chat_stream"], ssrl=True)
    chunks = [e for e in answer.events if isinstance(e, dict) and e.get("choices")]
    assert chunks and all("finish_reason" in c["choices"][0] for c in chunks)
    assert [c["choices"][0]["finish_reason"] is None for c in chunks[:-1]] == [True] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" in answer.events[-2] and answer.events[-2]["choices"] == []


def test_answers_deterministic_by_construction(ssrl: httpx.Client) -> None:
    choice = send(ssrl, *CASES["chat_structured_choice"], ssrl=True).body
    assert choice["choices"][0]["message"]["content"] == "Paris"
    for name in ("chat_tools_named", "chat_tools_required"):
        body = send(ssrl, *CASES[name], ssrl=True).body
        calls = body["choices"][0]["message"]["tool_calls"]
        assert calls and calls[0]["function"]["name"] == "get_weather", body
    completion_choice = send(ssrl, *CASES["completion_structured_choice"], ssrl=True).body
    assert completion_choice["choices"][0]["text"] == "Paris"
    tokens = send(ssrl, *CASES["tokenize_prompt"], ssrl=True).body["tokens"]
    text = ssrl.post("/detokenize", json={"model": M, "tokens": tokens}).json()["prompt"]
    assert text == "Hello world"


# ----- ssrl's own rules on top: caps, auth, and what self-search cannot honour -------------


def test_server_caps_apply_to_forwarded_requests(ssrl: httpx.Client) -> None:
    response = ssrl.post(CHAT, json={**chat(n=17), **OFF})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"


def test_forwarded_routes_need_the_key(parity_server: RunningServer) -> None:
    with httpx.Client(base_url=parity_server.base_url, timeout=60) as anonymous:
        assert anonymous.post(CHAT, json={**chat(), **OFF}).status_code == 401
        assert anonymous.post("/v1/responses", json=CASES["responses_plain"][2]).status_code == 401


def test_invalid_self_search_options_stay_ssrl_s_400(ssrl: httpx.Client) -> None:
    response = ssrl.post(CHAT, json=chat(self_search={"enabled": False, "policy": "bogus"}))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "self_search.policy"


# Tools, tool_choice, response_format and structured_outputs compose with self-search instead
# (server/composition.py; tests/e2e/test_composition.py).
SELF_SEARCH_REFUSED = [
    ("logit_bias", {"logit_bias": {"19556": 5}}),
    ("presence_penalty", {"presence_penalty": 0.5}),
    ("frequency_penalty", {"frequency_penalty": 0.5}),
    ("repetition_penalty", {"repetition_penalty": 1.2}),
    ("top_k", {"top_k": 5}),
    ("min_p", {"min_p": 0.1}),
    ("min_tokens", {"min_tokens": 3}),
    ("ignore_eos", {"ignore_eos": True}),
    ("bad_words", {"bad_words": ["Paris"]}),
    ("chat_template_kwargs", {"chat_template_kwargs": {"x": 1}}),
    ("prompt_logprobs", {"prompt_logprobs": 1}),
    ("echo", {"echo": True}),
    ("continue_final_message", {"continue_final_message": True}),
]


@pytest.mark.parametrize(("param", "fields"), SELF_SEARCH_REFUSED, ids=[p for p, _ in SELF_SEARCH_REFUSED])
def test_self_search_refuses_fields_it_cannot_honour(
    ssrl: httpx.Client, param: str, fields: dict[str, Any]
) -> None:
    for body in (chat(**fields), chat(**fields, self_search={"enabled": True})):
        response = ssrl.post(CHAT, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param
        assert error["code"] == "unsupported_parameter"


def test_openai_agents_run_with_a_forced_function_tool(parity_server: RunningServer) -> None:
    import asyncio

    import openai
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return "sunny"

    async def run() -> Any:
        client = openai.AsyncOpenAI(
            base_url=parity_server.base_url + "/v1", api_key=parity_server.api_key, max_retries=0
        )
        agent = Agent(
            name="weather",
            instructions="Answer with the weather tool.",
            model=OpenAIResponsesModel(model=M, openai_client=client),
            tools=[get_weather],
            model_settings=ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=300),
            tool_use_behavior="stop_on_first_tool",
        )
        try:
            return await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
        finally:
            await client.close()

    result = asyncio.run(run())
    assert result.final_output == "sunny"
    assert len(calls) == 1


def test_a_client_leaving_a_forwarded_stream_aborts_its_engine_request(ssrl: httpx.Client) -> None:
    from tests.e2e.test_openai_api import metric, poll, scrape

    body = completion(prompt="Count: 1, 2, 3,", max_tokens=1500, ignore_eos=True, stream=True)
    with ssrl.stream("POST", COMPLETIONS, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(scrape(ssrl), "vllm:num_requests_running") >= 1
    assert poll(lambda: metric(scrape(ssrl), "vllm:num_requests_running") == 0, timeout=30)


# ----- the reference half: both servers, field by field (SSRL_PARITY=1) --------------------


@pytest.mark.parametrize("name", list(CASES))
def test_case_matches_vllm_s_server(ssrl: httpx.Client, reference: httpx.Client, name: str) -> None:
    method, path, body = CASES[name]
    ours = send(ssrl, method, path, body, ssrl=True)
    theirs = send(reference, method, path, body, ssrl=False)
    assert (ours.status, ours.param) == (theirs.status, theirs.param)
    if not ours.stream and ours.status != 200:
        # One error shape on every route (issue 35): vLLM's `"type": "BadRequestError", "code":
        # 400` comes back as OpenAI's type and a string code; message and param are vLLM's.
        expected = openai_error_payload(theirs.status, theirs.body)["error"]
        error = ours.body["error"]
        assert (error["type"], error["code"]) == (expected["type"], expected["code"]), (error, theirs.body)
        assert shape(ours.body) == shape({"error": expected})
    else:
        assert ours.shape() == theirs.shape()


def test_record(reference: httpx.Client) -> None:
    """With SSRL_PARITY_RECORD=1: the recorded expectations are what the reference answers now."""
    if not os.environ.get("SSRL_PARITY_RECORD"):
        pytest.skip("re-records nothing unless SSRL_PARITY_RECORD=1")
    for name, (method, path, body) in CASES.items():
        answer = send(reference, method, path, body, ssrl=False)
        assert (answer.status, answer.param, _keys(answer)) == EXPECTED[name], name


# ----- remote engine mode: the same requests pass through to the remote vLLM server --------


def test_remote_engine_passes_requests_through(upstream: RunningServer, tmp_path: Any) -> None:
    router = start_router(upstream, API_KEY, tmp_path / "router.log", "--openai-serving", "vllm")
    try:
        with httpx.Client(base_url=router.base_url, headers=router.auth_headers, timeout=180) as client:
            choice = send(client, *CASES["chat_structured_choice"], ssrl=True)
            assert choice.status == 200, choice.body
            assert choice.body["choices"][0]["message"]["content"] == "Paris"
            assert choice.body["model"] == "upstream"  # the remote answer, unchanged
            # The remote server has no tool parser: its own 400 comes back as it is.
            named = send(client, *CASES["chat_tools_named"], ssrl=True)
            assert named.status == 400 and "tool-call-parser" in named.body["error"]["message"]
            bad = send(client, *CASES["chat_presence_bad"], ssrl=True)
            assert (bad.status, _keys(bad)) == (400, ERROR_KEYS)
            stream = send(client, *CASES["completion_stream"], ssrl=True)
            assert stream.status == 200 and stream.events[-1] == "[DONE]"
            for name in ("tokenize_prompt", "detokenize", "version", "responses_plain"):
                answer = send(client, *CASES[name], ssrl=True)
                assert answer.status == 200 and _keys(answer) == EXPECTED[name][2], name
            # Self-search (on by default) composes with a forced tool: the searches, then the
            # call, generated by the remote engine under the tool's schema.
            composed = client.post(CHAT, json=chat(tools=[WEATHER], tool_choice=NAMED, max_tokens=400))
            assert composed.status_code == 200, composed.text
            choice = composed.json()["choices"][0]
            assert "self_search" in choice and choice["finish_reason"] == "tool_calls", choice
            assert "city" in json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    finally:
        assert router.process is not None
        _stop(router.process)


# ----- property-based requests through vLLM's layer (--openai-serving vllm) -------------------


@pytest.mark.parametrize("path", list(FUZZED_FIELDS))
def test_forwarded_routes_never_answer_5xx(ssrl: httpx.Client, path: str) -> None:
    fuzz_forwarded(ssrl, M, path)
