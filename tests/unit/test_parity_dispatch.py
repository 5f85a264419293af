"""Who answers what (server/vllm_serving.py), on a scripted engine, without vLLM.

Nothing is silently ignored: a field the path a request takes cannot honour (the self-search
loop, or ssrl's own plain serving) answers 400 naming it; a forwarded request still meets
ssrl's caps; the routes that need vLLM's serving layer say so without one. The forwarding
itself (to vLLM's app, or to a remote server) is driven here with a stand-in serving object.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.vllm_serving import SELF_SEARCH_UNSUPPORTED, _ASGIForward
from tests.scripted_engine import ScriptedEngine, script
from tests.unit.test_http_layer import CHAT, COMPLETIONS, MODEL, chat, drive, post, sse_events


def engine() -> ScriptedEngine:
    return ScriptedEngine(responder=lambda call: script("Paris"))


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


COMPOSABLE = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("tool_choice", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("structured_outputs", {"structured_outputs": {"choice": ["a"]}}),
]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logit_bias", {"1": 5}),
        ("presence_penalty", 0.5),
        ("top_k", 5),
        ("min_tokens", 2),
        ("ignore_eos", True),
        ("echo", True),
    ],
)
def test_fields_the_path_cannot_honour_are_400(field: str, value: Any) -> None:
    # Self-search on, then ssrl's own plain chat: both refuse, naming the field.
    on = error_of(post(engine(), CHAT, chat(**{field: value}), self_search=True, search="none"), 400)
    assert (on["param"], on["code"]) == (field, "unsupported_parameter")
    assert "self-search" in on["message"]
    plain = error_of(post(engine(), CHAT, chat(**{field: value})), 400)
    assert (plain["param"], plain["code"]) == (field, "unsupported_parameter")
    assert "--openai-serving" in plain["message"]


@pytest.mark.parametrize(("field", "fields"), COMPOSABLE, ids=[f for f, _ in COMPOSABLE])
def test_tools_and_schemas_compose_with_self_search_but_not_with_ssrl_s_plain_chat(
    field: str, fields: dict[str, Any]
) -> None:
    # Self-search shapes its answer turn with them (server.composition); ssrl's own plain
    # serving cannot, and says where they are served.
    on = post(engine(), CHAT, chat(**fields), self_search=True, search="none")
    assert on.status_code == 200, on.text
    assert on.json()["choices"][0]["self_search"]["turns"] >= 0
    plain = error_of(post(engine(), CHAT, chat(**fields)), 400)
    assert plain["code"] == "unsupported_parameter"
    assert plain["param"] in fields


def test_neutral_values_pass() -> None:
    neutral = {k: v for k, v in SELF_SEARCH_UNSUPPORTED.items() if isinstance(v, bool | int | str)}
    response = post(engine(), CHAT, chat(**neutral))
    assert response.status_code == 200, response.text


def test_plain_completions_refuse_what_they_ignore_but_keep_echo() -> None:
    prompt = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    assert post(engine(), COMPLETIONS, {**prompt, "echo": True}).status_code == 200
    error = error_of(post(engine(), COMPLETIONS, {**prompt, "frequency_penalty": 1.0}), 400)
    assert error["param"] == "frequency_penalty"


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/tokenize"), ("POST", "/v1/responses"), ("GET", "/version")]
)
def test_vllm_only_routes_say_they_need_vllm(method: str, path: str) -> None:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.request(method, path, json={"model": MODEL} if method == "POST" else None)

    error = error_of(drive(engine(), body), 404)
    assert error["code"] == "not_available"


class _Echo:
    """A stand-in for vLLM's serving layer: answers with what it was sent."""

    max_model_len = 2048

    def __init__(self) -> None:
        self.bodies: list[Any] = []

    async def forward(self, request: Request, body: bytes) -> Response:
        self.bodies.append(json.loads(body))
        return JSONResponse({"forwarded": request.url.path})

    async def aclose(self) -> None:
        return None


def _drive_with(
    serving: _Echo, make_body: Any, openai_serving: str = "vllm", **settings: Any
) -> httpx.Response:
    from server import app as app_module

    real = app_module.build_openai_serving

    async def fake(engine: Any, settings_: Any, **_: Any) -> _Echo:
        return serving

    app_module.build_openai_serving = fake  # type: ignore[assignment]
    try:
        result: httpx.Response = drive(engine(), make_body, openai_serving=openai_serving, **settings)
        return result
    finally:
        app_module.build_openai_serving = real


def test_vllm_mode_forwards_without_the_extension_and_keeps_the_caps() -> None:
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post(CHAT, json=chat(top_k=3, self_search={"enabled": False})),
            await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "top_k": 3}),
            await client.post(CHAT, json=chat(n=5)),
            await client.post(CHAT, json=chat(self_search={"enabled": False, "policy": "bogus"})),
            await client.post("/tokenize", json={"model": MODEL, "prompt": "x"}),
        ]

    forwarded, completion, capped, bad_option, tokenize = _drive_with(serving, body, max_n=4)
    assert forwarded.json() == {"forwarded": CHAT}
    assert completion.json() == {"forwarded": COMPLETIONS}
    assert tokenize.json() == {"forwarded": "/tokenize"}
    assert serving.bodies[0] == chat(top_k=3)  # self_search is ssrl's; vLLM never sees it
    assert error_of(capped, 400)["param"] == "n"
    assert error_of(bad_option, 400)["param"] == "self_search.policy"


def test_asgi_forward_replays_the_body() -> None:
    seen: dict[str, Any] = {}

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen["body"] = (await receive())["body"]
        seen["router"] = "router" in scope
        await JSONResponse({"ok": True})(scope, receive, send)

    serving = _Echo()
    serving.forward = lambda request, body: _forward(inner, body)  # type: ignore[method-assign]

    async def _make(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x"})

    response = _drive_with(serving, _make)
    assert response.json() == {"ok": True}
    assert json.loads(seen["body"]) == {"model": MODEL, "prompt": "x"}
    assert seen["router"] is False


async def _forward(app: Any, body: bytes) -> Response:
    return _ASGIForward(app, body)


@pytest.mark.parametrize("self_search", [True, False])
def test_stream_chunks_carry_openai_s_nulls(self_search: bool) -> None:
    """`finish_reason` (and `logprobs`) null until known; with include_usage, `usage: null`
    on every chunk but the usage chunk; extension fields still left out when unset."""
    body = chat(stream=True, stream_options={"include_usage": True}, max_tokens=64)
    response = post(engine(), CHAT, body, self_search=self_search, search="none")
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0
    for chunk in chunks[:-1]:
        assert "usage" in chunk and chunk["usage"] is None, chunk
        for choice in chunk["choices"]:
            assert "finish_reason" in choice and "logprobs" in choice, choice
    finishes = [c["finish_reason"] for chunk in chunks[:-1] for c in chunk["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert all(
        "reasoning" not in c["delta"] or c["delta"]["reasoning"] is not None
        for chunk in chunks
        for c in chunk["choices"]
    )


def test_stream_without_include_usage_has_no_usage_field() -> None:
    response = post(engine(), CHAT, chat(stream=True, max_tokens=8))
    chunks = [e for e in sse_events(response) if isinstance(e, dict)]
    assert chunks and all("usage" not in c for c in chunks)


def test_auto_mode_forwards_only_what_ssrl_cannot_honour() -> None:
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post(CHAT, json=chat(self_search={"enabled": False})),
            await client.post(CHAT, json=chat(top_k=3, self_search={"enabled": False})),
            await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "max_tokens": 2}),
            await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "logit_bias": {"1": 5}}),
        ]

    plain_chat, tools_chat, plain_completion, biased_completion = _drive_with(
        serving, body, openai_serving="auto"
    )  # type: ignore[misc]
    # ssrl's own serving answers what it honours (its choices, not a forward marker) ...
    assert plain_chat.status_code == 200 and "choices" in plain_chat.json()
    assert plain_completion.status_code == 200 and "choices" in plain_completion.json()
    # ... and vLLM's serving layer what only it honours, without ssrl's extension.
    assert tools_chat.json() == {"forwarded": CHAT}
    assert biased_completion.json() == {"forwarded": COMPLETIONS}
    assert [b.get("top_k") for b in serving.bodies][:1] == [3]
    assert all("self_search" not in b for b in serving.bodies)
