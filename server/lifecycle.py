"""Graceful shutdown: on SIGTERM stop being ready, refuse new work, finish what is running.

Kubernetes sends SIGTERM and keeps routing a few requests for a moment; so readiness
turns false at once, new requests get 503 with `Retry-After` (a client or balancer retries
elsewhere), requests in flight finish within the grace period, and only then does uvicorn
shut down and the lifespan stop the engine. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError
from server.settings import ServeSettings

logger = logging.getLogger(__name__)

# Probes and scrapes keep answering while the server drains.
UNCOUNTED_PATHS = ("/health", "/ready", "/metrics")


class Drainer:
    """Shared admission state: the draining flag, requests in flight, and their cap."""

    def __init__(
        self, grace_s: float = 30.0, retry_after_s: int = 5, max_in_flight: int | None = None
    ) -> None:
        self.grace_s = grace_s
        self.retry_after_s = retry_after_s
        self.max_in_flight = max_in_flight
        self.draining = False
        self.in_flight = 0

    async def wait_idle(self, poll_s: float = 0.1) -> bool:
        """Wait until nothing is in flight or the grace period ends; True when idle."""
        deadline = time.monotonic() + self.grace_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return self.in_flight == 0


class DrainMiddleware:
    """Admission: counts requests in flight; answers new ones 503 + Retry-After while
    draining, and 429 + Retry-After past the in-flight cap (backpressure instead of an
    unbounded queue in front of the engine)."""

    def __init__(self, app: ASGIApp, drainer: Drainer) -> None:
        self.app = app
        self.drainer = drainer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drainer.draining:
            error = APIError(
                503,
                "The server is shutting down; retry on another replica.",
                code="server_shutting_down",
                headers={"Retry-After": str(self.drainer.retry_after_s)},
            )
            await error.response()(scope, receive, send)
            return
        cap = self.drainer.max_in_flight
        if cap is not None and self.drainer.in_flight >= cap:
            error = APIError(
                429,
                f"The server is at its limit of {cap} requests in flight; retry shortly.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
            await error.response()(scope, receive, send)
            return
        self.drainer.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drainer.in_flight -= 1


def uvicorn_config(app: ASGIApp, settings: ServeSettings) -> uvicorn.Config:
    """How `ssrl serve` runs uvicorn."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_keep_alive=30,
        # h11 stops reading a request head at --max-header-bytes; httptools (uvicorn's
        # "auto" choice) buffers a head of any size before the app can refuse it (431).
        http=settings.http_parser,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # The drain already waited for requests; this bounds what is left (connections).
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before the usual shutdown begins."""

    def __init__(self, config: uvicorn.Config, drainer: Drainer) -> None:
        super().__init__(config)
        self.drainer = drainer

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drainer.draining:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self.drainer.draining = True
        logger.info(
            "signal %d: draining %d request(s), grace %.0fs",
            sig,
            self.drainer.in_flight,
            self.drainer.grace_s,
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().handle_exit(sig, frame)
            return
        # A signal handler must not block: the drain runs as a task on the server's loop.
        loop.call_soon_threadsafe(loop.create_task, self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        idle = await self.drainer.wait_idle()
        if not idle:
            logger.warning("grace period over with %d request(s) in flight", self.drainer.in_flight)
        super().handle_exit(sig, None)
