"""The HTTP layer on a scripted engine: routes, response and stream assembly, auth, limits.

No vLLM here: `create_app` gets an engine factory returning a `ScriptedEngine`, and the app
runs in process (lifespan included) behind `httpx.ASGITransport`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from router.engine.default_model import DEFAULT_MODEL_NAME
from server.app import create_app, shared_metrics, until_disconnect
from server.auth import KeyChecker, bearer_token
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.serving import ServingContext
from server.serving_chat import PlainChat
from server.settings import ServeSettings
from tests.scripted_engine import Call, Script, ScriptedEngine, script

KEY = "sk-unit-one"
OTHER_KEY = "sk-unit-two"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = DEFAULT_MODEL_NAME
LIMIT = 10_000
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def make_app(engine: ScriptedEngine, **settings: Any):
    # The plain chat path, and no search index to build (unknown settings are ignored).
    values: dict[str, Any] = {
        "api_key": [KEY, OTHER_KEY],
        "warmup": False,
        "max_request_bytes": LIMIT,
        "self_search": False,
        "search": "none",
    }
    values.update(settings)
    return create_app(ServeSettings(**values), engine_factory=lambda _: engine)


def drive(
    engine: ScriptedEngine,
    body: Callable[[httpx.AsyncClient], Awaitable[Any]],
    *,
    headers: dict[str, str] | None = AUTH,
    **settings: Any,
) -> Any:
    """Run `body(client)` against a fresh app on `engine`, with the app's lifespan running."""
    app = make_app(engine, **settings)

    async def main() -> Any:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test", headers=headers or {}, timeout=30
            ) as client:
                return await body(client)

    return asyncio.run(main())


def post(engine: ScriptedEngine, path: str, payload: Any, **kwargs: Any) -> httpx.Response:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(path, json=payload)

    return drive(engine, body, **kwargs)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded, `[DONE]` kept as the string."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(
    response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def prompt_len(engine: ScriptedEngine, messages: list[dict[str, str]] = USER) -> int:
    return len(engine.apply_chat_template(messages))


def metric_value(name: str, labels: dict[str, str]) -> float:
    text = shared_metrics().exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# ----- chat, not streamed ------------------------------------------------------------------


def test_chat_returns_the_scripted_text_and_exact_usage() -> None:
    engine = ScriptedEngine(scripts=[script("Hello world")])
    response = post(engine, CHAT, chat(max_tokens=50, temperature=0))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "Hello world"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": prompt_len(engine),
        "completion_tokens": len("Hello world"),
        "total_tokens": prompt_len(engine) + len("Hello world"),
    }
    [call] = engine.calls
    assert call.prompt == engine.apply_chat_template(USER)
    assert call.options.max_tokens == 50
    assert call.options.temperature == 0
    assert call.options.include_stop_str_in_output is False
    assert engine.aborted == []


def test_chat_max_tokens_cuts_with_finish_reason_length() -> None:
    engine = ScriptedEngine(scripts=[script("abcdefgh")])
    response = post(engine, CHAT, chat(max_tokens=3))
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert choice["message"]["content"] == "abc"
    assert choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 3


def test_chat_max_completion_tokens_wins_over_max_tokens() -> None:
    engine = ScriptedEngine(scripts=[script("abcdefgh")])
    response = post(engine, CHAT, chat(max_tokens=6, max_completion_tokens=2))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "ab"
    assert engine.calls[0].options.max_tokens == 2


def test_chat_without_max_tokens_asks_for_the_rest_of_the_context() -> None:
    engine = ScriptedEngine(scripts=[script("ok")], max_model_len=100)
    response = post(engine, CHAT, chat())
    assert response.status_code == 200, response.text
    assert engine.calls[0].options.max_tokens == 100 - prompt_len(engine)
    # Unset temperature and top_p take the served model's defaults: the embedded model's
    # measured ones (server.sampling; OpenAI's 1 for a model that says nothing).
    from router.engine.default_model import EMBEDDED_SAMPLING_DEFAULTS

    assert engine.calls[0].options.temperature == EMBEDDED_SAMPLING_DEFAULTS["temperature"]
    assert engine.calls[0].options.top_p == 1.0


def _by_seed(call: Call) -> Script:
    return script({100: "first", 101: "second choice"}[call.options.seed])


def test_chat_n_2_numbers_choices_and_sums_usage() -> None:
    engine = ScriptedEngine(responder=_by_seed)
    response = post(engine, CHAT, chat(n=2, seed=100, max_tokens=20))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    # Choice i samples with seed + i, so each choice has its own script.
    assert [c["message"]["content"] for c in body["choices"]] == ["first", "second choice"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]
    assert body["usage"]["completion_tokens"] == len("first") + len("second choice")
    assert body["usage"]["prompt_tokens"] == prompt_len(engine)
    assert sorted(c.options.seed for c in engine.calls) == [100, 101]


def test_chat_stop_string_is_cut_and_excluded() -> None:
    engine = ScriptedEngine(scripts=[script("Hello world. Bye")])
    response = post(engine, CHAT, chat(stop=["world", "zzz"], max_tokens=50))
    assert response.status_code == 200, response.text
    body = response.json()
    [choice] = body["choices"]
    assert choice["message"]["content"] == "Hello "
    assert "world" not in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    # The token that completed the stop string was generated, so it is counted.
    assert body["usage"]["completion_tokens"] == len("Hello world")
    assert engine.calls[0].options.stop == ("world", "zzz")


def test_chat_single_stop_string() -> None:
    engine = ScriptedEngine(scripts=[script("one\ntwo")])
    response = post(engine, CHAT, chat(stop="\n"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "one"


def test_chat_logprobs_are_sorted_and_bounded() -> None:
    engine = ScriptedEngine(scripts=[script("abc", prob=0.5, alternatives=(0.3, 0.1, 0.05))])
    response = post(engine, CHAT, chat(logprobs=True, top_logprobs=2, max_tokens=10))
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["a", "b", "c"]
    for entry in content:
        assert entry["logprob"] == pytest.approx(math.log(0.5))
        assert entry["bytes"] == list(entry["token"].encode())
        tops = entry["top_logprobs"]
        assert len(tops) == 2
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == entry["token"]
        assert tops[1]["logprob"] == pytest.approx(math.log(0.3))
    assert engine.calls[0].options.logprobs == 2


def test_chat_without_logprobs_has_none() -> None:
    engine = ScriptedEngine(scripts=[script("abc")])
    response = post(engine, CHAT, chat())
    assert "logprobs" not in response.json()["choices"][0]
    assert engine.calls[0].options.logprobs is None


# ----- chat, streamed ----------------------------------------------------------------------


def test_chat_stream_assembles_the_same_text() -> None:
    engine = ScriptedEngine(scripts=[script("Hi there")])
    response = post(
        engine,
        CHAT,
        chat(stream=True, max_tokens=50, stream_options={"include_usage": True}),
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hi there"
    finishes = [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and c["choices"][0].get("finish_reason")
    ]
    assert finishes == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt_len(engine),
        "completion_tokens": len("Hi there"),
        "total_tokens": prompt_len(engine) + len("Hi there"),
    }


def test_chat_stream_without_include_usage_has_no_usage() -> None:
    engine = ScriptedEngine(scripts=[script("abcdef")])
    response = post(engine, CHAT, chat(stream=True, max_tokens=4))
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    finishes = [e["choices"][0].get("finish_reason") for e in events[:-1]]
    assert finishes[-1] == "length"


def test_chat_stream_n_2_keeps_choices_apart() -> None:
    engine = ScriptedEngine(responder=_by_seed, delay=0.001)
    response = post(
        engine,
        CHAT,
        chat(stream=True, n=2, seed=100, stream_options={"include_usage": True}),
    )
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    roles, finishes = set(), {}
    for event in events[:-1]:
        for choice in event["choices"]:
            delta = choice["delta"]
            if delta.get("role"):
                roles.add(choice["index"])
            texts[choice["index"]] += delta.get("content") or ""
            if choice.get("finish_reason"):
                finishes[choice["index"]] = choice["finish_reason"]
    assert roles == {0, 1}
    assert texts == {0: "first", 1: "second choice"}
    assert finishes == {0: "stop", 1: "stop"}
    assert events[-2]["usage"]["completion_tokens"] == len("first") + len("second choice")


def test_chat_stream_stop_string_is_excluded() -> None:
    engine = ScriptedEngine(scripts=[script("Hello world. Bye")])
    events = sse_events(post(engine, CHAT, chat(stream=True, stop="world")))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"])
    assert text == "Hello "


def test_chat_stream_logprobs_ride_on_the_chunks() -> None:
    engine = ScriptedEngine(scripts=[script("ab", prob=0.5, alternatives=(0.25,))])
    events = sse_events(post(engine, CHAT, chat(stream=True, logprobs=True, top_logprobs=1)))
    entries = [
        entry
        for c in events[:-1]
        if c["choices"] and c["choices"][0].get("logprobs")
        for entry in c["choices"][0]["logprobs"]["content"]
    ]
    assert [e["token"] for e in entries] == ["a", "b"]
    assert all(len(e["top_logprobs"]) == 1 for e in entries)


# ----- completions -------------------------------------------------------------------------


def test_completion_text_usage_and_echo() -> None:
    engine = ScriptedEngine(scripts=[script(" world")])
    response = post(engine, COMPLETIONS, {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "echo": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["text"] == "Hello world"
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


def test_completion_defaults_to_16_tokens() -> None:
    engine = ScriptedEngine(scripts=[script("x" * 40)])
    response = post(engine, COMPLETIONS, {"model": MODEL, "prompt": "Hi"})
    assert response.json()["choices"][0]["text"] == "x" * 16
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_completion_prompt_list_numbers_choices_prompt_major() -> None:
    def by_prompt(call: Call) -> Script:
        return script(f"<{call.prompt_text}:{call.options.seed}>")

    engine = ScriptedEngine(responder=by_prompt)
    response = post(
        engine, COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"], "n": 2, "seed": 5, "max_tokens": 20}
    )
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == ["<a:5>", "<a:6>", "<b:5>", "<b:6>"]
    assert response.json()["usage"]["prompt_tokens"] == 2


def test_completion_token_id_prompt() -> None:
    engine = ScriptedEngine(scripts=[script("!")])
    ids = engine.tokenizer.encode("Hey")
    response = post(engine, COMPLETIONS, {"model": MODEL, "prompt": ids, "echo": True})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "Hey!"
    assert engine.calls[0].prompt == ids


def test_completion_token_ids_out_of_vocab_are_rejected() -> None:
    engine = ScriptedEngine(vocab_size=100)
    response = post(engine, COMPLETIONS, {"model": MODEL, "prompt": [1, 100]})
    assert_error(response, 400, param="prompt")
    assert engine.calls == []


def test_completion_logprobs_offsets_follow_the_text() -> None:
    engine = ScriptedEngine(scripts=[script("xyz", prob=0.5, alternatives=(0.25, 0.125))])
    response = post(engine, COMPLETIONS, {"model": MODEL, "prompt": "ab", "logprobs": 2, "echo": True})
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["x", "y", "z"]
    assert logprobs["text_offset"] == [2, 3, 4]
    assert logprobs["token_logprobs"] == pytest.approx([math.log(0.5)] * 3)
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])


def test_completion_stream_assembles_text_and_usage() -> None:
    engine = ScriptedEngine(scripts=[script("abc")])
    response = post(
        engine,
        COMPLETIONS,
        {
            "model": MODEL,
            "prompt": "Q",
            "stream": True,
            "echo": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == "Qabc"
    finishes = [e["choices"][0].get("finish_reason") for e in events[:-1] if e["choices"]]
    assert finishes[-1] == "stop"
    assert events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 3


# ----- validation errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "status", "code", "param"),
    [
        ({"messages": USER}, 400, "missing_required_parameter", "model"),
        ({"model": MODEL}, 400, "missing_required_parameter", "messages"),
        (chat(model="nope"), 404, "model_not_found", "model"),
        (chat(temperature=-0.5), 400, "invalid_value", "temperature"),
        ({"model": MODEL, "messages": "x"}, 400, "invalid_value", "messages"),
        ({"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
        (chat(stream_options={"include_usage": True}), 400, "invalid_value", None),
        (chat(logprobs=True, top_logprobs=21), 400, "invalid_value", "top_logprobs"),
        (chat(top_logprobs=2), 400, "invalid_value", None),
        (chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
        (chat(n=0), 400, "invalid_value", "n"),
        (chat(stop=[""]), 400, "invalid_value", "stop"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_value", None),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            400,
            "invalid_value",
            "messages",
        ),
    ],
)
def test_chat_validation_errors_have_openai_shape(payload, status, code, param) -> None:
    engine = ScriptedEngine()
    assert_error(post(engine, CHAT, payload), status, code=code, param=param)
    assert engine.calls == []


def test_malformed_json_is_400() -> None:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})

    assert_error(drive(ScriptedEngine(), body), 400, code="invalid_json")


def test_max_tokens_beyond_the_context_is_400() -> None:
    engine = ScriptedEngine(max_model_len=64)
    assert_error(
        post(engine, CHAT, chat(max_tokens=64)), 400, code="context_length_exceeded", param="max_tokens"
    )
    assert engine.calls == []


def test_prompt_beyond_the_context_is_400() -> None:
    engine = ScriptedEngine(max_model_len=64)
    long = [{"role": "user", "content": "x" * 100}]
    assert_error(
        post(engine, CHAT, chat(messages=long)), 400, code="context_length_exceeded", param="messages"
    )
    assert_error(
        post(engine, COMPLETIONS, {"model": MODEL, "prompt": "y" * 100}), 400, code="context_length_exceeded"
    )


def test_top_logprobs_above_the_server_max_is_400() -> None:
    engine = ScriptedEngine()
    response = post(engine, CHAT, chat(logprobs=True, top_logprobs=6), max_logprobs=5)
    assert_error(response, 400, code="invalid_value", param="top_logprobs")
    response = post(engine, COMPLETIONS, {"model": MODEL, "prompt": "x", "logprobs": 6}, max_logprobs=5)
    assert_error(response, 400, param="logprobs")
    assert engine.calls == []


def test_unknown_route_and_method_have_openai_shape() -> None:
    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        return await client.get("/v1/nothing-here"), await client.get(CHAT)

    missing, wrong_method = drive(ScriptedEngine(), body)
    assert_error(missing, 404)
    assert_error(wrong_method, 405)


def test_models_routes() -> None:
    async def body(client: httpx.AsyncClient):
        return (
            await client.get("/v1/models"),
            await client.get(f"/v1/models/{MODEL}"),
            await client.get("/v1/models/other"),
        )

    listing, card, missing = drive(ScriptedEngine(max_model_len=321), body)
    assert listing.status_code == 200
    # The embedded model first, then the native adapter served beside it (its base as parent).
    entry, adapter = listing.json()["data"]
    assert entry["id"] == MODEL and entry["object"] == "model" and entry["max_model_len"] == 321
    assert adapter["id"] == "smollm2-135m-ssrl" and adapter["parent"] == MODEL
    assert card.status_code == 200 and card.json()["id"] == MODEL
    assert_error(missing, 404, code="model_not_found")


# ----- dead engine -------------------------------------------------------------------------


def test_health_is_503_when_the_engine_is_dead() -> None:
    engine = ScriptedEngine()

    async def body(client: httpx.AsyncClient):
        healthy = await client.get("/health")
        engine.dead = True
        return healthy, await client.get("/health")

    healthy, dead = drive(engine, body)
    assert healthy.status_code == 200 and healthy.json() == {"status": "ok"}
    assert dead.status_code == 503


def test_chat_on_a_dead_engine_is_503() -> None:
    engine = ScriptedEngine(dead=True)
    assert_error(post(engine, CHAT, chat()), 503, code="engine_unavailable")
    assert_error(post(engine, COMPLETIONS, {"model": MODEL, "prompt": "x"}), 503)


def test_stream_on_a_dead_engine_ends_with_an_error_event() -> None:
    engine = ScriptedEngine(dead=True)
    events = sse_events(post(engine, CHAT, chat(stream=True)))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_unavailable"


# ----- auth --------------------------------------------------------------------------------


def test_key_checker_accepts_only_configured_keys() -> None:
    checker = KeyChecker(["alpha", "beta"])
    assert checker.enabled
    assert checker.accepts("alpha")
    assert checker.accepts("beta")
    for wrong in ("gamma", "alph", "alphaa", "ALPHA", "", None):
        assert not checker.accepts(wrong), wrong


def test_key_checker_without_keys_is_disabled() -> None:
    checker = KeyChecker([])
    assert not checker.enabled
    assert not checker.accepts("anything")
    assert not checker.accepts(None)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc  ", "abc"),
        ("Bearer", None),
        ("Bearer    ", None),
        ("Basic abc", None),
        ("abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token_parsing(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_missing_and_wrong_keys_are_401() -> None:
    async def body(client: httpx.AsyncClient):
        return (
            await client.get("/v1/models"),
            await client.get("/v1/models", headers={"Authorization": "Bearer wrong"}),
            await client.post(CHAT, json=chat(), headers={"Authorization": "Basic " + KEY}),
            await client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}),
            await client.get("/health"),
            await client.get("/metrics"),
        )

    engine = ScriptedEngine()
    missing, wrong, basic, other, health, metrics = drive(engine, body, headers=None)
    error = assert_error(missing, 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Incorrect" in assert_error(wrong, 401, code="invalid_api_key")["message"]
    assert_error(basic, 401, code="invalid_api_key")
    assert engine.calls == []
    assert other.status_code == 200
    assert health.status_code == 200
    assert metrics.status_code == 200 and "ssrl_requests_total" in metrics.text


def test_without_configured_keys_the_api_is_open() -> None:
    async def body(client: httpx.AsyncClient):
        return await client.get("/v1/models")

    assert drive(ScriptedEngine(), body, headers=None, api_key=[]).status_code == 200


# ----- body size limit ---------------------------------------------------------------------


def test_body_over_the_limit_by_content_length_is_413() -> None:
    engine = ScriptedEngine()
    payload = chat(messages=[{"role": "user", "content": "x" * (LIMIT + 10)}])
    assert_error(post(engine, CHAT, payload), 413, code="request_too_large")
    assert engine.calls == []


def _chunked(data: bytes, size: int) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start : start + size]

    return chunks


def test_chunked_body_over_the_limit_is_413() -> None:
    engine = ScriptedEngine(scripts=[script("fine")])
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * (LIMIT * 2)}])).encode()
    small = json.dumps(chat(max_tokens=8)).encode()

    async def body(client: httpx.AsyncClient):
        headers = {"content-type": "application/json"}
        over = client.build_request("POST", CHAT, content=_chunked(big, 1024)(), headers=headers)
        assert "content-length" not in over.headers
        under = client.build_request("POST", CHAT, content=_chunked(small, 7)(), headers=headers)
        assert "content-length" not in under.headers
        return await client.send(over), await client.send(under)

    over, under = drive(engine, body)
    assert_error(over, 413)
    # A chunked body under the limit is read whole and served.
    assert under.status_code == 200, under.text
    assert under.json()["choices"][0]["message"]["content"] == "fine"
    assert len(engine.calls) == 1


# ----- metrics -----------------------------------------------------------------------------


def test_request_and_token_counters_increase() -> None:
    labels = {"route": CHAT, "method": "POST", "status": "200"}
    before = metric_value("ssrl_requests_total", labels)
    tokens_before = metric_value("ssrl_completion_tokens_total", {"route": CHAT})
    prompt_before = metric_value("ssrl_prompt_tokens_total", {"route": CHAT})
    engine = ScriptedEngine(scripts=[script("four")])
    assert post(engine, CHAT, chat()).status_code == 200
    assert metric_value("ssrl_requests_total", labels) == before + 1
    assert metric_value("ssrl_completion_tokens_total", {"route": CHAT}) == tokens_before + 4
    assert metric_value("ssrl_prompt_tokens_total", {"route": CHAT}) == prompt_before + prompt_len(engine)


# ----- aborts ------------------------------------------------------------------------------


def _context(engine: ScriptedEngine) -> ServingContext:
    return ServingContext(engine=engine, model_name=MODEL, metrics=shared_metrics())


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize("n", [1, 2])
def test_stream_consumer_leaving_early_aborts_the_engine_requests(n: int) -> None:
    engine = ScriptedEngine(responder=lambda call: script("z" * 500), delay=0.01)
    aborts_before = metric_value("ssrl_engine_aborts_total", {"route": CHAT})

    async def main() -> None:
        request = ChatCompletionRequest(model=MODEL, messages=USER, stream=True, n=n)
        stream = PlainChat(_context(engine), request).stream()
        seen = []
        async for chunk in stream:
            seen.append(chunk)
            if len(seen) == n + 1:  # the role chunk(s), then the first content chunk
                break
        await stream.aclose()
        assert await _until(lambda: len(engine.aborted) == n), engine.aborted

    asyncio.run(main())
    assert sorted(engine.aborted) == sorted(c.request_id for c in engine.calls)
    assert metric_value("ssrl_engine_aborts_total", {"route": CHAT}) == aborts_before + n


def test_finished_streams_are_not_aborted() -> None:
    engine = ScriptedEngine(scripts=[script("done")])

    async def main() -> list[str]:
        request = ChatCompletionRequest(model=MODEL, messages=USER, stream=True)
        return [chunk async for chunk in PlainChat(_context(engine), request).stream()]

    chunks = asyncio.run(main())
    assert chunks[-1] == "data: [DONE]\n\n"
    assert engine.aborted == []


def test_non_stream_request_is_aborted_when_the_client_disconnects() -> None:
    engine = ScriptedEngine(responder=lambda call: script("z" * 500), delay=0.01)

    async def main() -> APIError:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0.1)
            return {"type": "http.disconnect"}

        http_request = Request({"type": "http", "method": "POST", "path": CHAT, "headers": []}, receive)
        request = ChatCompletionRequest(model=MODEL, messages=USER)
        with pytest.raises(APIError) as caught:
            await until_disconnect(http_request, PlainChat(_context(engine), request).complete())
        assert await _until(lambda: bool(engine.aborted))
        return caught.value

    error = asyncio.run(main())
    assert error.status == 499
    assert engine.aborted == [engine.calls[0].request_id]
