"""The Python client (`clients.client`) and `ssrl chat` without the engine.

Retries run against a real loopback server (a tiny Starlette app under uvicorn in a thread,
answering what each test scripts); parsing runs on httpx.MockTransport with canned bodies
shaped like ssrl's (and a plain OpenAI server's) answers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clients import chat as chat_cli
from clients.cli import main as cli_main
from clients.client import (
    AnswerDelta,
    AsyncSSRLClient,
    ReasoningDelta,
    SearchDecided,
    SSRLAPIError,
    SSRLClient,
    SSRLConnectionError,
    TraceEvent,
    Usage,
    build_chat_body,
    iter_sse_data,
    parse_chat_response,
)

MODEL = "tiny-model"

ENTROPY = {
    "mean": 1.1,
    "max": 2.2,
    "min_prob": 0.09,
    "ssrl": 0.28,
    "tokens": 3,
    "kind": "topk_lower_bound",
    "per_token": [1.0, 2.2, 0.1],
}
DOCS = [
    {
        "title": "Mona Lisa",
        "url": "https://en.wikipedia.org/wiki/Mona_Lisa",
        "snippet": "The Mona Lisa is a portrait by Leonardo da Vinci.",
        "score": 34.2,
        "source": "local",
    },
    {
        "title": "Leonardo da Vinci",
        "url": "https://en.wikipedia.org/wiki/Leonardo_da_Vinci",
        "snippet": "Italian polymath.",
        "score": 20.1,
        "source": "local",
    },
]
SEARCH = {
    "index": 0,
    "query": "Mona Lisa painter",
    "entropy": ENTROPY,
    "decision": "external",
    "reason": "policy always searches externally",
    "policy": "always",
    "fallback": None,
    "backend": "local",
    "latency_s": 0.01,
    "documents": DOCS,
    "information": "Doc 1(Title: Mona Lisa) ...",
}
TRACE = {
    "searches": [SEARCH],
    "external_calls": 1,
    "internal_fills": 0,
    "fallbacks": 0,
    "turns": 1,
    "answered": True,
    "notes": [],
}
REASONING = (
    "<search> Mona Lisa painter </search>\n\n<information>Doc 1(Title: Mona Lisa) ..."
    "</information>\n\n<answer> Leonardo da Vinci </answer>"
)
ANNOTATIONS = [
    {
        "type": "url_citation",
        "url_citation": {"url": d["url"], "title": d["title"], "start_index": 0, "end_index": 17},
    }
    for d in DOCS
]
USAGE = {"prompt_tokens": 600, "completion_tokens": 30, "total_tokens": 630}

SSRL_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "self_search": TRACE,
            "message": {
                "role": "assistant",
                "content": "Leonardo da Vinci",
                "reasoning": REASONING,
                "annotations": ANNOTATIONS,
            },
        }
    ],
    "usage": USAGE,
}
PLAIN_RESPONSE = {
    "id": "chatcmpl-2",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-x",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {"role": "assistant", "content": "Paris.", "refusal": None},
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}
MODELS = {
    "object": "list",
    "data": [{"id": MODEL, "object": "model", "owned_by": "ssrl"}, {"id": "other", "object": "model"}],
}


def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def sse(*chunks: dict[str, Any], done: bool = True) -> str:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    return body + ("data: [DONE]\n\n" if done else "")


# What ssrl streams for one search (the shape of server/serving_self_search.py).
SSRL_STREAM = sse(
    chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
    chunk([{"index": 0, "delta": {"reasoning": "<search> Mona Lisa"}}]),
    chunk([{"index": 0, "delta": {"reasoning": " painter </search>"}}]),
    chunk([{"index": 0, "delta": {}, "self_search": {"type": "search", "search": SEARCH}}]),
    chunk(
        [
            {
                "index": 0,
                "delta": {"reasoning": "\n\n<information>Doc 1(Title: Mona Lisa) ...</information>\n\n"},
            }
        ]
    ),
    chunk([{"index": 0, "delta": {"reasoning": "<answer>"}}]),
    chunk([{"index": 0, "delta": {"content": "Leonardo", "reasoning": " Leonardo"}}]),
    chunk([{"index": 0, "delta": {"content": " da Vinci", "reasoning": " da Vinci </answer>"}}]),
    chunk(
        [
            {
                "index": 0,
                "delta": {},
                "finish_reason": "stop",
                "annotations": ANNOTATIONS,
                "self_search": {"type": "trace", **TRACE},
            }
        ]
    ),
    chunk([], USAGE),
)
PLAIN_STREAM = sse(
    chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
    chunk([{"index": 0, "delta": {"content": "Par"}}]),
    chunk([{"index": 0, "delta": {"content": "is."}}]),
    chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    chunk([], {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}),
)


# ----- a real loopback server -----------------------------------------------------------------


@dataclass
class Scripted:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    sse: str | None = None


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class Loopback:
    """Answers each path with the next scripted response (the last one repeats)."""

    def __init__(self) -> None:
        self.script: dict[str, list[Scripted]] = {}
        self.seen: list[Seen] = []
        self.base_url = ""

    def reset(self) -> None:
        self.script = {}
        self.seen = []

    def on(self, path: str, *responses: Scripted) -> None:
        self.script[path] = list(responses)

    def count(self, path: str) -> int:
        return sum(1 for s in self.seen if s.path == path)

    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        self.seen.append(
            Seen(request.method, request.url.path, dict(request.headers), json.loads(raw) if raw else None)
        )
        queue = self.script.get(request.url.path)
        if not queue:
            return Response(
                json.dumps(
                    {
                        "error": {
                            "message": "no script",
                            "type": "not_found_error",
                            "param": None,
                            "code": None,
                        }
                    }
                ),
                status_code=404,
                media_type="application/json",
            )
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if answer.sse is not None:
            return Response(
                answer.sse, status_code=answer.status, headers=answer.headers, media_type="text/event-stream"
            )
        return Response(
            json.dumps(answer.body),
            status_code=answer.status,
            headers=answer.headers,
            media_type="application/json",
        )


@pytest.fixture(scope="module")
def loopback() -> Iterator[Loopback]:
    state = Loopback()
    app = Starlette(routes=[Route("/{path:path}", state.handle, methods=["GET", "POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "loopback server did not start"
        time.sleep(0.02)
    state.base_url = f"http://127.0.0.1:{port}"
    yield state
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def lb(loopback: Loopback) -> Loopback:
    loopback.reset()
    return loopback


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Retries:
    """An `on_retry` hook that records (attempt, wait, reason) of each retry."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float, str]] = []

    def __call__(self, attempt: int, wait: float, reason: str) -> None:
        self.calls.append((attempt, wait, reason))

    @property
    def waits(self) -> list[float]:
        return [w for _, w, _ in self.calls]


CHAT = "/v1/chat/completions"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client reads these, and rich treats FORCE_COLOR/TTY_COMPATIBLE as a terminal.
    for name in ("SSRL_BASE_URL", "SSRL_API_KEY", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)


# ----- retries (real sockets) ---------------------------------------------------------------


def test_503_with_retry_after_is_retried_then_succeeds(lb: Loopback) -> None:
    lb.on(
        CHAT,
        Scripted(
            503,
            {"error": {"message": "busy", "type": "service_unavailable_error", "param": None, "code": None}},
            {"Retry-After": "0"},
        ),
        Scripted(200, SSRL_RESPONSE),
    )
    retries = Retries()
    with SSRLClient(lb.base_url, "k", max_retries=2, on_retry=retries) as client:
        result = client.chat("Who painted the Mona Lisa?", model=MODEL)
    assert result.answer == "Leonardo da Vinci"
    assert lb.count(CHAT) == 2
    assert retries.calls == [(1, 0.0, "HTTP 503")]
    # Both attempts carried the same body and the key.
    assert lb.seen[0].body == lb.seen[1].body
    assert lb.seen[1].headers["authorization"] == "Bearer k"


def test_429_honours_retry_after(lb: Loopback) -> None:
    lb.on(
        CHAT,
        Scripted(
            429,
            {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}},
            {"Retry-After": "0.05"},
        ),
        Scripted(200, SSRL_RESPONSE),
    )
    retries = Retries()
    with SSRLClient(lb.base_url, max_retries=1, on_retry=retries) as client:
        result = client.chat("q", model=MODEL)
    assert result.trace is not None and result.trace.external_calls == 1
    assert lb.count(CHAT) == 2
    assert retries.calls == [(1, 0.05, "HTTP 429")]


def test_retry_after_is_capped_and_attempts_are_bounded(lb: Loopback) -> None:
    lb.on(
        CHAT,
        Scripted(
            503,
            {
                "error": {
                    "message": "engine down",
                    "type": "service_unavailable_error",
                    "param": None,
                    "code": "engine_unavailable",
                }
            },
            {"Retry-After": "3600"},
        ),
    )
    retries = Retries()
    with (
        SSRLClient(lb.base_url, max_retries=2, max_retry_wait=0.01, on_retry=retries) as client,
        pytest.raises(SSRLAPIError) as info,
    ):
        client.chat("q", model=MODEL)
    assert lb.count(CHAT) == 3
    assert retries.waits == [0.01, 0.01]
    assert info.value.status_code == 503 and info.value.code == "engine_unavailable"
    assert "engine down" in str(info.value)


def test_other_errors_are_not_retried(lb: Loopback) -> None:
    lb.on(
        CHAT,
        Scripted(
            400,
            {
                "error": {
                    "message": "bad policy",
                    "type": "invalid_request_error",
                    "param": "self_search.policy",
                    "code": "invalid_value",
                }
            },
        ),
    )
    with SSRLClient(lb.base_url, max_retries=3) as client, pytest.raises(SSRLAPIError) as info:
        client.chat("q", model=MODEL, policy="always")
    assert lb.count(CHAT) == 1
    assert info.value.status_code == 400 and info.value.param == "self_search.policy"


def test_stream_is_retried_before_it_starts(lb: Loopback) -> None:
    lb.on(
        CHAT,
        Scripted(503, {"error": {"message": "busy"}}, {"Retry-After": "0"}),
        Scripted(200, sse=SSRL_STREAM),
    )
    with SSRLClient(lb.base_url, max_retries=1) as client:
        events = list(client.stream("q", model=MODEL))
    assert lb.count(CHAT) == 2
    assert isinstance(events[-1], Usage) and events[-1].total_tokens == 630
    assert lb.seen[-1].body["stream"] is True
    assert lb.seen[-1].body["stream_options"] == {"include_usage": True}


def test_async_client_retries_too(lb: Loopback) -> None:
    lb.on(
        CHAT,
        Scripted(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}),
        Scripted(200, SSRL_RESPONSE),
    )

    async def go() -> str:
        async with AsyncSSRLClient(lb.base_url, max_retries=2, on_retry=retries) as client:
            return (await client.chat("q", model=MODEL)).answer

    retries = Retries()
    answer = asyncio.run(go())
    assert answer == "Leonardo da Vinci"
    assert lb.count(CHAT) == 2 and retries.calls == [(1, 0.0, "HTTP 429")]


def test_connection_refused_is_retried_then_reported() -> None:
    port = closed_port()
    retries = Retries()
    with (
        SSRLClient(f"http://127.0.0.1:{port}", max_retries=2, backoff=0.001, on_retry=retries) as client,
        pytest.raises(SSRLConnectionError) as info,
    ):
        client.chat("q", model=MODEL)
    # Three attempts: two retries after an exponential backoff (no Retry-After to honour).
    assert [(a, r) for a, w, r in retries.calls] == [(1, "ConnectError"), (2, "ConnectError")]
    assert all(0 < w <= 0.002 for w in retries.waits)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_default_model_is_the_first_listed(lb: Loopback) -> None:
    lb.on("/v1/models", Scripted(200, MODELS))
    lb.on(CHAT, Scripted(200, SSRL_RESPONSE))
    with SSRLClient(lb.base_url) as client:
        client.chat("one")
        client.chat("two")
    assert [s.body["model"] for s in lb.seen if s.path == CHAT] == [MODEL, MODEL]
    assert lb.count("/v1/models") == 1


# ----- parsing (mock transport) -------------------------------------------------------------


def mock_client(handler: Any, **kwargs: Any) -> SSRLClient:
    return SSRLClient("http://ssrl.test", "key", transport=httpx.MockTransport(handler), **kwargs)


def test_ssrl_response_parses_into_the_typed_trace() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=SSRL_RESPONSE)

    with mock_client(handler) as client:
        result = client.chat(
            [{"role": "user", "content": "Who?"}],
            model=MODEL,
            policy="always",
            threshold=0.5,
            aggregate="max",
            mode="guided",
            max_turns=2,
            docs_per_search=2,
            max_external_calls=1,
            votes=1,
            temperature=0,
            max_tokens=64,
            seed=7,
        )
    assert sent[0]["self_search"] == {
        "policy": "always",
        "threshold": 0.5,
        "aggregate": "max",
        "mode": "guided",
        "max_turns": 2,
        "docs_per_search": 2,
        "max_external_calls": 1,
        "votes": 1,
    }
    assert sent[0]["temperature"] == 0 and sent[0]["seed"] == 7 and sent[0]["max_tokens"] == 64
    assert "n" not in sent[0] and "stream" not in sent[0]
    assert result.answer == "Leonardo da Vinci" and result.reasoning == REASONING
    trace = result.trace
    assert trace is not None and trace.turns == 1 and trace.answered and trace.vote is None
    search = trace.searches[0]
    assert search.query == "Mona Lisa painter" and search.decision == "external"
    assert search.entropy.per_token == [1.0, 2.2, 0.1] and search.entropy.kind == "topk_lower_bound"
    assert [d.title for d in search.documents] == ["Mona Lisa", "Leonardo da Vinci"]
    assert search.fallback is None and search.backend == "local"
    assert [c.url for c in result.citations] == [d["url"] for d in DOCS]
    assert result.usage == Usage(**USAGE)
    assert result.raw == SSRL_RESPONSE


def test_plain_openai_response_has_no_trace() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=PLAIN_RESPONSE)

    with mock_client(handler) as client:
        result = client.chat("Capital of France?", model="gpt-x", temperature=0)
    assert "self_search" not in sent[0]  # a plain server never sees the extension
    assert result.trace is None and result.reasoning is None and result.citations == []
    assert result.answer == "Paris."
    assert result.usage is not None and result.usage.total_tokens == 11


def test_votes_trace_parses() -> None:
    sample = {"answer": "Leonardo", **TRACE}
    trace = {
        **TRACE,
        "vote": {
            "votes": 2,
            "winner": 1,
            "answer": "leonardo",
            "counts": {"leonardo": 2},
            "samples": [sample, sample],
        },
    }
    data = {**SSRL_RESPONSE, "choices": [{**SSRL_RESPONSE["choices"][0], "self_search": trace}]}
    result = parse_chat_response(data)
    assert result.trace is not None and result.trace.vote is not None
    assert result.trace.vote.winner == 1 and result.trace.vote.samples[1].answer == "Leonardo"
    assert result.trace.vote.samples[0].searches[0].query == "Mona Lisa painter"


def test_stream_yields_typed_events_in_order() -> None:
    with mock_client(
        lambda r: httpx.Response(200, text=SSRL_STREAM, headers={"content-type": "text/event-stream"})
    ) as c:
        events = list(c.stream("Who painted the Mona Lisa?", model=MODEL, policy="always"))
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "ReasoningDelta",
        "ReasoningDelta",
        "SearchDecided",
        "ReasoningDelta",
        "ReasoningDelta",
        "ReasoningDelta",
        "AnswerDelta",
        "ReasoningDelta",
        "AnswerDelta",
        "TraceEvent",
        "Usage",
    ]
    search = events[2]
    assert isinstance(search, SearchDecided) and search.record.query == "Mona Lisa painter"
    assert search.record.entropy.mean == 1.1 and search.record.documents[0].title == "Mona Lisa"
    # The search event precedes the information it decided.
    info_at = next(
        i for i, e in enumerate(events) if isinstance(e, ReasoningDelta) and "<information>" in e.text
    )
    assert info_at > 2
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "Leonardo da Vinci"
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)).endswith("</answer>")
    final = events[-2]
    assert isinstance(final, TraceEvent) and final.finish_reason == "stop"
    assert final.trace is not None and final.trace.external_calls == 1
    assert [c.title for c in final.citations] == ["Mona Lisa", "Leonardo da Vinci"]
    assert events[-1] == Usage(**USAGE)


def test_plain_openai_stream_finishes_without_trace() -> None:
    with mock_client(lambda r: httpx.Response(200, text=PLAIN_STREAM)) as c:
        events = list(c.stream("Capital of France?", model="gpt-x"))
    assert [type(e).__name__ for e in events] == ["AnswerDelta", "AnswerDelta", "TraceEvent", "Usage"]
    assert isinstance(events[2], TraceEvent) and events[2].trace is None
    assert events[2].finish_reason == "stop"


def test_async_stream_matches_sync() -> None:
    async def go() -> list[Any]:
        transport = httpx.MockTransport(lambda r: httpx.Response(200, text=SSRL_STREAM))
        async with AsyncSSRLClient("http://ssrl.test", transport=transport) as client:
            return [e async for e in client.stream("q", model=MODEL)]

    with mock_client(lambda r: httpx.Response(200, text=SSRL_STREAM)) as c:
        sync_events = list(c.stream("q", model=MODEL))
    assert asyncio.run(go()) == sync_events


def test_error_inside_a_stream_raises() -> None:
    body = sse(
        chunk([{"index": 0, "delta": {"reasoning": "<search>"}}]),
        {
            "error": {
                "message": "The engine is not available.",
                "type": "service_unavailable_error",
                "param": None,
                "code": "engine_unavailable",
            }
        },
    )
    with mock_client(lambda r: httpx.Response(200, text=body)) as c:
        events = []
        with pytest.raises(SSRLAPIError) as info:
            for event in c.stream("q", model=MODEL):
                events.append(event)
    assert len(events) == 1 and isinstance(events[0], ReasoningDelta)
    assert info.value.status_code == 503 and info.value.code == "engine_unavailable"


def test_sse_decoder_handles_comments_crlf_and_multiline_data() -> None:
    lines = [
        ": keep-alive",
        'data: {"a":',
        "data: 1}",
        "",
        "event: x\r",
        "data: 2\r",
        "\r",
        "data: [DONE]",
        "",
        "data: after-done",
        "",
    ]
    assert list(iter_sse_data(lines)) == ['{"a":\n1}', "2"]


def test_non_json_error_body_is_reported() -> None:
    with (
        mock_client(lambda r: httpx.Response(502, text="Bad Gateway from proxy")) as c,
        pytest.raises(SSRLAPIError) as info,
    ):
        c.chat("q", model=MODEL)
    assert info.value.status_code == 502 and "Bad Gateway from proxy" in str(info.value)


def test_environment_sets_base_url_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"query": "Mona Lisa", "backend": "local", "latency_s": 0.001, "data": [DOCS[0]]}
        )

    monkeypatch.setenv("SSRL_BASE_URL", "http://env-host:9999/v1/")
    monkeypatch.setenv("SSRL_API_KEY", "env-key")
    with SSRLClient(transport=httpx.MockTransport(handler)) as client:
        result = client.search("Mona Lisa", 1)
    assert str(seen[0].url) == "http://env-host:9999/v1/search?q=Mona+Lisa&k=1"
    assert seen[0].headers["authorization"] == "Bearer env-key"
    assert result.backend == "local" and result.data[0].url == DOCS[0]["url"]
    monkeypatch.delenv("SSRL_BASE_URL")
    monkeypatch.delenv("SSRL_API_KEY")
    with SSRLClient(transport=httpx.MockTransport(handler)) as client:
        assert client.base_url == "http://127.0.0.1:8000" and client.api_key is None


def test_retrieve_parses_both_shapes() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        doc = {"id": "local-0", "contents": "Mona Lisa\nA portrait."}
        hits = [{"document": doc, "score": 3.5}] if body.get("return_scores") else [doc]
        return httpx.Response(200, json={"result": [hits for _ in body["queries"]]})

    with mock_client(handler) as client:
        plain = client.retrieve("Mona Lisa")
        scored = client.retrieve(["Mona Lisa", "Paris"], topk=1, return_scores=True)
    assert bodies == [
        {"queries": ["Mona Lisa"]},
        {"queries": ["Mona Lisa", "Paris"], "topk": 1, "return_scores": True},
    ]
    assert plain[0][0].title == "Mona Lisa" and plain[0][0].text == "A portrait."
    assert plain[0][0].score is None
    assert len(scored) == 2 and scored[1][0].score == 3.5 and scored[1][0].id == "local-0"


def test_extra_body_merges_into_self_search() -> None:
    body = build_chat_body(
        "q", MODEL, policy="budget", n=2, extra_body={"self_search": {"budget": 1}, "top_p": 0.9}
    )
    assert body["self_search"] == {"policy": "budget", "budget": 1}
    assert body["n"] == 2 and body["top_p"] == 0.9
    assert build_chat_body("q", MODEL, enabled=False)["self_search"] == {"enabled": False}


# ----- `ssrl chat` against the loopback server ---------------------------------------------


def test_cli_plain_output(lb: Loopback, capsys: pytest.CaptureFixture[str]) -> None:
    lb.on(CHAT, Scripted(200, sse=SSRL_STREAM))
    code = cli_main(
        [
            "chat",
            "--base-url",
            lb.base_url,
            "--api-key",
            "k",
            "--model",
            MODEL,
            "--policy",
            "always",
            "--max-turns",
            "1",
            "--no-search",
            "Who painted the Mona Lisa?",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[search 1] Mona Lisa painter" in out
    assert "decision: external (policy always searches externally)" in out
    assert "entropy mean 1.100" in out
    assert "  - Mona Lisa <https://en.wikipedia.org/wiki/Mona_Lisa>" in out
    assert "Answer: Leonardo da Vinci\n" in out
    assert "\x1b[" not in out  # captured output is not a terminal: plain text
    sent = lb.seen[-1]
    assert sent.body["self_search"] == {"policy": "always", "max_turns": 1, "enabled": False}
    assert sent.headers["authorization"] == "Bearer k"


def test_cli_forced_colour_has_ansi(lb: Loopback, capsys: pytest.CaptureFixture[str]) -> None:
    lb.on(CHAT, Scripted(200, sse=SSRL_STREAM))
    code = cli_main(["chat", "--base-url", lb.base_url, "--model", MODEL, "--color", "always", "q"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "\x1b[" in out and "Leonardo da Vinci" in out and "Mona Lisa painter" in out


def test_cli_json_prints_the_raw_response(lb: Loopback, capsys: pytest.CaptureFixture[str]) -> None:
    lb.on(CHAT, Scripted(200, SSRL_RESPONSE))
    code = cli_main(["chat", "--base-url", lb.base_url, "--model", MODEL, "--json", "q"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert json.loads(out) == SSRL_RESPONSE
    assert "stream" not in lb.seen[-1].body


def test_cli_server_error_is_one_line(lb: Loopback, capsys: pytest.CaptureFixture[str]) -> None:
    lb.on(
        CHAT,
        Scripted(
            401,
            {
                "error": {
                    "message": "Incorrect API key provided.",
                    "type": "authentication_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
        ),
    )
    code = cli_main(["chat", "--base-url", lb.base_url, "--model", MODEL, "q"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Incorrect API key provided." in err and "401" in err
    assert "Traceback" not in err


def test_cli_connection_refused_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    code = cli_main(["chat", "--base-url", f"http://127.0.0.1:{port}", "--max-retries", "0", "q"])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("ssrl chat: error: cannot reach") and err.count("\n") == 1


def test_cli_interactive_keeps_the_conversation(
    lb: Loopback, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    lb.on(CHAT, Scripted(200, sse=PLAIN_STREAM))
    monkeypatch.setattr("sys.stdin", io.StringIO("Capital of France?\n\nAnd of Italy?\nexit\nnever read\n"))
    code = cli_main(["chat", "--base-url", lb.base_url, "--model", MODEL])
    out, _ = capsys.readouterr()
    assert code == 0
    assert out.count("Answer: Paris.") == 2
    bodies = [s.body for s in lb.seen if s.path == CHAT]
    assert len(bodies) == 2
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]


def test_cli_renderer_choice() -> None:
    import io

    assert type(chat_cli.make_renderer("never", True, io.StringIO())) is chat_cli.PlainRenderer
    assert type(chat_cli.make_renderer("auto", True, io.StringIO())) is chat_cli.PlainRenderer
    assert isinstance(chat_cli.make_renderer("always", True, io.StringIO()), chat_cli.RichRenderer)


def test_chat_options_are_one_typed_dict_shared_by_every_call() -> None:
    from clients.client import ChatOptions

    options: ChatOptions = {"policy": "always", "max_turns": 1, "temperature": 0.0}
    body = build_chat_body("q", MODEL, stream=True, **options)
    assert body["self_search"] == {"policy": "always", "max_turns": 1}
    assert body["temperature"] == 0.0 and body["stream"] is True
    with pytest.raises(TypeError, match="unknown chat option"):
        build_chat_body("q", MODEL, polcy="always")  # type: ignore[typeddict-unknown-key]
    from clients.client import SAMPLING_OPTIONS, SELF_SEARCH_OPTIONS

    routed = {*SELF_SEARCH_OPTIONS, *SAMPLING_OPTIONS, "n", "extra_body"}
    assert routed == set(ChatOptions.__annotations__)  # every option goes somewhere
    # Every chat()/stream() takes exactly these options, declared once.
    import inspect

    for method in (SSRLClient.chat, SSRLClient.stream, AsyncSSRLClient.chat, AsyncSSRLClient.stream):
        params = inspect.signature(method).parameters
        assert list(params) == ["self", "messages", "model", "options"], method
