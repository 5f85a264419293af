"""Metrics that tell the truth (issue 29, item 7), scraped from the exposition.

- a request whose body stalls and is then dropped by the client is counted 499 (client
  closed request), not 500; one the transport's body deadline closed, 408;
- the per-route metrics of `/v1/responses` (its web_search self-search loop) carry that
  route, not `/v1/chat/completions`: engine aborts, prompt and completion tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message, Receive, Scope, Send

from router.engine.base import GenerationDelta, SamplingOptions
from router.engine.default_model import DEFAULT_MODEL_NAME
from server.app import create_app, shared_metrics
from server.metrics import BODY_DEADLINE_EXPIRED, HTTPMetrics, MetricsMiddleware
from server.settings import ServeSettings
from tests.scripted_engine import Call, ScriptedEngine
from tests.unit.test_admission_release import http_scope, one_body
from tests.unit.test_http_layer import metric_value
from tests.unit.test_self_search_http import Responder

MODEL = DEFAULT_MODEL_NAME
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
WEB_SEARCH = {
    "model": MODEL,
    "input": "What is the capital of France?",
    "tools": [{"type": "web_search"}],
    "self_search": {"policy": "never"},
}


def metric(name: str, **labels: str) -> float:
    return metric_value(name, labels)


def metric_sum(name: str, **labels: str) -> float:
    """`name`'s samples with these labels, summed over every other label."""
    text = shared_metrics().exposition().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def requests(route: str, status: str) -> float:
    return metric("ssrl_requests_total", route=route, method="POST", status=status)


def make_app(engine: ScriptedEngine) -> Any:
    settings = ServeSettings(warmup=False, search="none", search_mode="native")
    return create_app(settings, engine_factory=lambda _: engine)


async def ignore(message: Message) -> None:
    return None


def serve(app: Any, path: str, receive: Receive, scope: Scope | None = None) -> None:
    """One request through the whole app, its lifespan running; what it sends is dropped."""

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await app(scope or http_scope(path), receive, ignore)

    asyncio.run(main())


def stalled_then(ending: Message, scope: Scope | None = None) -> Receive:
    """Half a body, then `ending` (marking `scope` the way the transport's deadline does)."""
    messages = [{"type": "http.request", "body": b'{"model": ', "more_body": True}, ending]

    async def receive() -> Message:
        message = messages.pop(0)
        if message["type"] == "http.disconnect" and scope is not None:
            scope[BODY_DEADLINE_EXPIRED] = True
        return message

    return receive


# ----- (a) the status of a request that was never answered -------------------------------------


def test_a_stalled_body_the_client_dropped_counts_499_not_500() -> None:
    app = make_app(ScriptedEngine())
    before_499, before_500 = requests(CHAT, "499"), requests(CHAT, "500")
    serve(app, CHAT, stalled_then({"type": "http.disconnect"}))
    assert requests(CHAT, "499") == before_499 + 1
    assert requests(CHAT, "500") == before_500


def test_a_stalled_body_the_body_deadline_closed_counts_408() -> None:
    app = make_app(ScriptedEngine())
    scope = http_scope(CHAT)
    before_408, before_499 = requests(CHAT, "408"), requests(CHAT, "499")
    serve(app, CHAT, stalled_then({"type": "http.disconnect"}, scope), scope)
    assert requests(CHAT, "408") == before_408 + 1
    assert requests(CHAT, "499") == before_499


def statuses(app: Any, receive: Receive) -> dict[str, float]:
    """The `ssrl_requests_total` statuses MetricsMiddleware counts for one request to `app`
    (its own registry); an error the app raises is left to the server's error handler."""
    metrics = HTTPMetrics(registry=CollectorRegistry())
    with contextlib.suppress(RuntimeError):
        asyncio.run(MetricsMiddleware(app, metrics, router_app=app)(http_scope("/x"), receive, ignore))
    return {
        s.labels["status"]: s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.name == "ssrl_requests_total"
    }


def test_an_app_that_returns_without_answering_a_present_client_is_still_500() -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()

    assert statuses(silent, one_body(b"{}")) == {"500": 1.0}


def test_an_app_that_raises_before_answering_is_500_even_if_the_client_left() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise RuntimeError("no answer")

    async def gone() -> Message:
        return {"type": "http.disconnect"}

    assert statuses(broken, gone) == {"500": 1.0}


# ----- (b) the route label of /v1/responses ----------------------------------------------------


@dataclass
class StallingEngine(ScriptedEngine):
    """Each generation starts and never ends: only its abort (the client leaving) ends it."""

    generating: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(
        self, prompt: str | Sequence[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.calls.append(Call(ids, options, request_id))
        self.generating.set()
        await asyncio.Event().wait()
        yield GenerationDelta(text="", token_ids=())  # never reached: an async generator


def test_an_engine_abort_on_responses_carries_the_responses_route() -> None:
    engine = StallingEngine()
    app = make_app(engine)
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(WEB_SEARCH).encode()}
        await engine.generating.wait()  # the client leaves once the engine works for it
        return {"type": "http.disconnect"}

    before = metric("ssrl_engine_aborts_total", route=RESPONSES)
    chat_before = metric("ssrl_engine_aborts_total", route=CHAT)
    closed_before = requests(RESPONSES, "499")
    serve(app, RESPONSES, receive)
    assert engine.aborted == [engine.calls[0].request_id]
    assert metric("ssrl_engine_aborts_total", route=RESPONSES) == before + 1
    assert metric("ssrl_engine_aborts_total", route=CHAT) == chat_before
    assert requests(RESPONSES, "499") == closed_before + 1


def test_responses_tokens_carry_the_responses_route() -> None:
    engine = ScriptedEngine(responder=Responder())
    app = make_app(engine)
    prompt_before = metric("ssrl_prompt_tokens_total", route=RESPONSES)
    completion_before = metric("ssrl_completion_tokens_total", route=RESPONSES)
    chat_prompt_before = metric("ssrl_prompt_tokens_total", route=CHAT)
    chat_completion_before = metric("ssrl_completion_tokens_total", route=CHAT)
    ok_before = requests(RESPONSES, "200")
    serve(app, RESPONSES, one_body(json.dumps(WEB_SEARCH).encode()))
    assert requests(RESPONSES, "200") == ok_before + 1
    assert metric("ssrl_prompt_tokens_total", route=RESPONSES) > prompt_before
    assert metric("ssrl_completion_tokens_total", route=RESPONSES) > completion_before
    assert metric("ssrl_prompt_tokens_total", route=CHAT) == chat_prompt_before
    assert metric("ssrl_completion_tokens_total", route=CHAT) == chat_completion_before
