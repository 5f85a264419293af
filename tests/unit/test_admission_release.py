"""The in-flight slot is free by the time the client has read the end of the answer (issue 29,
item 5).

DrainMiddleware used to give a request's slot back only when the whole ASGI call returned,
after the empty closing body message of a stream: a client that sent its next request as
soon as it read `data: [DONE]` found the slot still held and got a spurious 429 at
`--max-in-flight`. Each test records `drainer.in_flight` at the moment a given message is
sent (in process, no timing): the slot must be free before the response's last piece leaves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from router.engine.default_model import DEFAULT_MODEL_NAME
from server.app import create_app
from server.lifecycle import Drainer, DrainMiddleware
from server.settings import ServeSettings
from tests.scripted_engine import ScriptedEngine, script
from tests.unit.test_self_search_http import Responder

MODEL = DEFAULT_MODEL_NAME
SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
JSON = [(b"content-type", b"application/json")]
DONE = b"data: [DONE]\n\n"

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def http_scope(path: str = "/v1/chat/completions", method: str = "POST") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 123),
        "server": ("test", 80),
    }


def one_body(body: bytes) -> Receive:
    """The request body in one message, then nothing (the client stays connected)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # cancelled by whoever listens for a disconnect
        raise AssertionError("unreachable")

    return receive


class Recorder:
    """A server's `send` that notes, for each body message, the slots in flight as it left."""

    def __init__(self, drainer: Drainer) -> None:
        self.drainer = drainer
        self.bodies: list[tuple[bytes, bool, int]] = []  # (body, more_body, in_flight)
        self.status: int | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            more = bool(message.get("more_body", False))
            self.bodies.append((bytes(message.get("body", b"")), more, self.drainer.in_flight))

    def in_flight_at(self, predicate: Callable[[bytes], bool]) -> list[int]:
        return [slots for body, _, slots in self.bodies if predicate(body)]


def streaming_app(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> ASGIApp:
    """Sends `chunks` as one streamed body, then the empty closing message (as Starlette's
    StreamingResponse does)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def drive(app: ASGIApp, drainer: Drainer, path: str = "/v1/chat/completions") -> Recorder:
    recorder = Recorder(drainer)
    asyncio.run(DrainMiddleware(app, drainer)(http_scope(path), one_body(b"{}"), recorder))
    return recorder


# ----- pure ASGI apps behind DrainMiddleware -------------------------------------------------


def test_a_chat_stream_frees_its_slot_before_done_is_sent() -> None:
    drainer = Drainer(max_in_flight=1)
    chunks = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', DONE]
    recorder = drive(streaming_app(SSE, chunks), drainer)
    assert recorder.in_flight_at(lambda b: b.startswith(b'data: {"n"')) == [1, 1]
    assert recorder.in_flight_at(lambda b: b == DONE) == [0]
    assert drainer.in_flight == 0  # released once: the closing message and `finally` found it free


@pytest.mark.parametrize(
    "terminal", ["response.completed", "response.incomplete", "response.failed", "error"]
)
def test_a_responses_stream_frees_its_slot_before_its_terminal_event(terminal: str) -> None:
    drainer = Drainer(max_in_flight=1)
    events = [
        b'event: response.created\ndata: {"type":"response.created"}\n\n',
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n',
        b'event: %s\ndata: {"type":"%s"}\n\n' % (terminal.encode(), terminal.encode()),
    ]
    recorder = drive(streaming_app(SSE, events), drainer, path="/v1/responses")
    assert [slots for _, _, slots in recorder.bodies] == [1, 1, 0, 0]
    assert drainer.in_flight == 0


def test_a_plain_answer_frees_its_slot_before_its_last_body_message() -> None:
    drainer = Drainer(max_in_flight=1)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": b'{"a":', "more_body": True})
        await send({"type": "http.response.body", "body": b"1}"})

    recorder = drive(app, drainer)
    assert [(more, slots) for _, more, slots in recorder.bodies] == [(True, 1), (False, 0)]
    assert drainer.in_flight == 0


def test_done_text_in_a_body_that_is_no_event_stream_keeps_the_slot() -> None:
    drainer = Drainer(max_in_flight=1)
    recorder = drive(streaming_app(JSON, [b'{"text": "', DONE, b'"}']), drainer)
    assert [slots for _, _, slots in recorder.bodies] == [1, 1, 1, 0]
    assert drainer.in_flight == 0


def test_a_stream_that_never_ends_is_released_once_by_the_finally() -> None:
    drainer = Drainer(max_in_flight=1)
    seen: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        await send({"type": "http.response.body", "body": b'data: {"n":1}\n\n', "more_body": True})
        seen.append(drainer.in_flight)
        raise RuntimeError("the stream broke before [DONE]")

    with pytest.raises(RuntimeError):
        drive(app, drainer)
    assert seen == [1]
    assert drainer.in_flight == 0


# ----- the app on a scripted engine ----------------------------------------------------------


def serve_once(app: Any, path: str, payload: dict[str, Any]) -> Recorder:
    """One request through the whole middleware stack (lifespan running), as a server sends it."""
    recorder = Recorder(app.state.drainer)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await app(http_scope(path), one_body(json.dumps(payload).encode()), recorder)

    asyncio.run(main())
    return recorder


def test_a_streamed_chat_has_its_slot_free_when_done_reaches_the_client() -> None:
    engine = ScriptedEngine(responder=lambda call: script("Hello there"))
    settings = ServeSettings(warmup=False, search="none", max_in_flight=1)
    app = create_app(settings, engine_factory=lambda _: engine)
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "self_search": {"enabled": False},
        "stream": True,
    }
    recorder = serve_once(app, "/v1/chat/completions", payload)
    assert recorder.status == 200
    assert recorder.in_flight_at(lambda b: b == DONE) == [0]
    assert app.state.drainer.in_flight == 0


def test_a_streamed_web_search_response_has_its_slot_free_at_response_completed() -> None:
    engine = ScriptedEngine(responder=Responder())
    settings = ServeSettings(warmup=False, search="none", search_mode="native", max_in_flight=1)
    app = create_app(settings, engine_factory=lambda _: engine)
    payload = {
        "model": MODEL,
        "input": "What is the capital of France?",
        "tools": [{"type": "web_search"}],
        "self_search": {"policy": "never"},
        "stream": True,
    }
    recorder = serve_once(app, "/v1/responses", payload)
    assert recorder.status == 200, recorder.bodies
    assert recorder.in_flight_at(lambda b: b.startswith(b"event: response.created")) == [1]
    assert recorder.in_flight_at(lambda b: b.startswith(b"event: response.completed")) == [0]
    assert app.state.drainer.in_flight == 0
