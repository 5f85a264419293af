"""Prometheus metrics of the HTTP surface (`ssrl_*`), beside vLLM's own (`vllm:*`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.search.allowance import BUDGET_FALLBACK

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_ENTROPY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class HTTPMetrics:
    """The server's own metric families, registered once per registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.requests = Counter(
            "ssrl_requests",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "ssrl_request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "ssrl_requests_in_flight", "Requests being served now.", ["route"], registry=registry
        )
        self.ttft = Histogram(
            "ssrl_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "ssrl_prompt_tokens", "Prompt tokens processed.", ["route"], registry=registry
        )
        self.completion_tokens = Counter(
            "ssrl_completion_tokens", "Tokens generated.", ["route"], registry=registry
        )
        self.completion_tokens_per_request = Histogram(
            "ssrl_completion_tokens_per_request",
            "Generated tokens per request.",
            ["route"],
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.engine_aborts = Counter(
            "ssrl_engine_aborts",
            "Engine requests aborted because the client went away.",
            ["route"],
            registry=registry,
        )

        self.searches = Counter(
            "ssrl_searches",
            "Searches by decision, backend and outcome (ok, fallback: external failed and the "
            "model filled in, budget: the key's search budget was spent and the model filled in, "
            "self_filled, skipped).",
            ["decision", "backend", "outcome"],
            registry=registry,
        )
        self.query_entropy = Histogram(
            "ssrl_query_entropy_nats",
            "Mean next-token entropy of each search query, by decision.",
            ["decision"],
            buckets=_ENTROPY_BUCKETS,
            registry=registry,
        )
        self.turns = Histogram(
            "ssrl_search_turns_per_request",
            "Searches per trajectory.",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16),
            registry=registry,
        )
        self.search_seconds = Histogram(
            "ssrl_search_seconds",
            "Time spent in external search calls.",
            ["backend"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )

        self.search_attempts = Counter(
            "ssrl_search_attempts",
            "Requests sent to search providers (retries included).",
            ["backend"],
            registry=registry,
        )
        self.search_retries = Counter(
            "ssrl_search_retries",
            "Search attempts retried, by reason (transport, rate_limited, server_error).",
            ["backend", "reason"],
            registry=registry,
        )
        self.search_results = Counter(
            "ssrl_search_results",
            "Searches through the resilience layer by outcome (ok, error, circuit_open, timeout).",
            ["backend", "outcome"],
            registry=registry,
        )
        self.search_breaker = Gauge(
            "ssrl_search_breaker_open",
            "1 while a backend's circuit breaker is open, 0.5 half-open, 0 closed.",
            ["backend"],
            registry=registry,
        )
        self.search_cache = Counter(
            "ssrl_search_cache",
            "Search cache lookups by result (hit, miss).",
            ["backend", "result"],
            registry=registry,
        )
        # Over all keys: a label per key would be a time series per key forever
        # (per-key figures: GET /v1/search_budget, and the log line when a key runs out).
        self.search_budget = Counter(
            "ssrl_search_budget",
            "Per-key search budget checks over all keys, by result (spent: an external search "
            "counted; refunded: given back, it cost no provider call; denied: self-filled or "
            "429 because the key's budget was spent).",
            ["result"],
            registry=registry,
        )

        # What replicas share through Redis (--redis-url); absent without it.
        self.shared_state_up = Gauge(
            "ssrl_shared_state_up",
            "1 while Redis answers (rate limits and search budgets shared between replicas), "
            "0 while this replica uses its own.",
            ["store"],
            registry=registry,
        )
        self.shared_state_errors = Counter(
            "ssrl_shared_state_errors",
            "Redis calls that failed, by operation (rate_limit, budget, ping).",
            ["operation"],
            registry=registry,
        )
        self.shared_state_local = Counter(
            "ssrl_shared_state_local",
            "Checks this replica answered from its own state because Redis was out, by "
            "operation (rate_limit, budget).",
            ["operation"],
            registry=registry,
        )

    def record_trajectory(self, searches: Sequence[Any]) -> None:
        """Count one finished trajectory's searches (router.loop.SearchRecord objects)."""
        self.turns.observe(len(searches))
        for record in searches:
            backend = record.backend or "none"
            if record.route == "skipped":
                outcome = "skipped"
            elif record.route == "internal":
                outcome = "self_filled"
            elif record.fallback == BUDGET_FALLBACK:
                outcome = "budget"  # nothing was sent: no latency to observe
            else:
                outcome = "fallback" if record.fallback else "ok"
                self.search_seconds.labels(backend).observe(record.latency_s)
            self.searches.labels(record.route, backend, outcome).inc()
            if record.route != "skipped":
                self.query_entropy.labels(record.route).observe(record.entropy.mean)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# Label values come from fixed sets, never from the request: any client can send any method
# or status-looking thing, and each distinct value would be a new time series forever.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
KNOWN_STATUSES = frozenset(
    {200, 201, 204, 304, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 431, 499}
    | {500, 501, 502, 503, 504}
)


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def status_label(status: int) -> str:
    """The status itself when it is one the server answers, else its class (`4xx`)."""
    if status in KNOWN_STATUSES:
        return str(status)
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def _route_template(app: ASGIApp, scope: Scope) -> str:
    """The matched route's path template, so label values stay bounded."""
    partial = None
    for route in getattr(app, "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "unmatched"))
        if match == Match.PARTIAL and partial is None:
            partial = getattr(route, "path", None)  # the path matched, the method did not
    return partial or "unmatched"


# Set (True) in a request's scope by the transport when its body deadline closed the
# connection (server/http_server.py): the transport itself answered 408, the app only saw a
# disconnect.
BODY_DEADLINE_EXPIRED = "ssrl.body_deadline_expired"


def unanswered_status(scope: Scope, client_left: bool) -> int:
    """The status of a request the app returned from without answering: 408 when the body
    deadline closed it, 499 (client closed request) when the client left first, else 500.
    A body that stalled and was then dropped is no server error."""
    if scope.get(BODY_DEADLINE_EXPIRED):
        return 408
    return 499 if client_left else 500


class MetricsMiddleware:
    """Counts every HTTP request by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: HTTPMetrics, router_app: ASGIApp) -> None:
        self.app = app
        self.metrics = metrics
        self.router_app = router_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route_template(self.router_app, scope)
        status: int | None = None  # the answer's status once it starts
        client_left = False
        start = time.perf_counter()

        async def recording_receive() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect":
                client_left = True
            return message

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        gauge = self.metrics.in_flight.labels(route)
        gauge.inc()
        raised = True
        try:
            await self.app(scope, recording_receive, recording_send)
            raised = False
        finally:
            gauge.dec()
            if status is None:  # an exception is answered 500 outside (ServerErrorMiddleware)
                status = 500 if raised else unanswered_status(scope, client_left)
            self.metrics.requests.labels(
                route, method_label(str(scope.get("method", ""))), status_label(status)
            ).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


_BREAKER_VALUES = {"closed": 0.0, "half_open": 0.5, "open": 1.0}


class SearchMetricsObserver:
    """The resilience and cache layers' callbacks (router.search.resilience.SearchObserver),
    mapped onto Prometheus; router/ reports, server/ owns the metrics."""

    def __init__(self, metrics: HTTPMetrics) -> None:
        self.m = metrics

    def on_attempt(self, backend: str, attempt: int) -> None:
        self.m.search_attempts.labels(backend).inc()

    def on_retry(self, backend: str, reason: str, wait_s: float) -> None:
        self.m.search_retries.labels(backend, reason).inc()

    def on_result(self, backend: str, outcome: str, latency_s: float) -> None:
        self.m.search_results.labels(backend, outcome).inc()

    def on_breaker(self, backend: str, state: str) -> None:
        self.m.search_breaker.labels(backend).set(_BREAKER_VALUES.get(state, 0.0))

    def on_cache(self, backend: str, hit: bool) -> None:
        self.m.search_cache.labels(backend, "hit" if hit else "miss").inc()
