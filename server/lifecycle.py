"""Graceful shutdown: on SIGTERM stop being ready, refuse new work, finish what is running.

Kubernetes sends SIGTERM and keeps routing a few requests for a moment; so readiness
turns false at once, new requests get 503 with `Retry-After` (a client or balancer retries
elsewhere), requests in flight finish within the grace period, and only then does uvicorn
shut down and the lifespan stop the engine. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import PROBE_PATHS
from server.errors import APIError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Probes and scrapes keep answering while the server drains: the same paths that need no key.
UNCOUNTED_PATHS = PROBE_PATHS


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
        # True while the engine factory runs (blocking this thread): a signal then stops it.
        self.starting = False
        # What start-up is doing, for the log line of a signal that interrupts it.
        self.startup_phase = "starting"

    async def wait_idle(self, poll_s: float = 0.1) -> bool:
        """Wait until nothing is in flight or the grace period ends; True when idle."""
        deadline = time.monotonic() + self.grace_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return self.in_flight == 0


class DrainMiddleware:
    """Admission: counts requests in flight; answers new ones 503 + Retry-After while
    draining, and 429 + Retry-After past the in-flight cap (backpressure instead of an
    unbounded queue in front of the engine).

    A request counts only once its whole body is here: the body is read first (bounded by
    BodySizeLimitMiddleware outside, and in time by the transport's body deadline), then the
    request is admitted and the app gets the buffered body. So clients that open a request
    and stall its body hold no slot; eight of them cannot lock out everyone else. It stops
    counting just before the answer's last piece is sent (`releasing_send`), so a client
    that has read the answer finds the slot free.
    """

    def __init__(self, app: ASGIApp, drainer: Drainer) -> None:
        self.app = app
        self.drainer = drainer

    def _refusal(self) -> APIError | None:
        if self.drainer.draining:
            return APIError(
                503,
                "The server is shutting down; retry on another replica.",
                code="server_shutting_down",
                headers={"Retry-After": str(self.drainer.retry_after_s)},
            )
        cap = self.drainer.max_in_flight
        if cap is not None and self.drainer.in_flight >= cap:
            return APIError(
                429,
                f"The server is at its limit of {cap} requests in flight; retry shortly.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        body: bytes | None = None
        error = self._refusal()
        if error is None:
            try:
                body = await read_body(receive)
            except HTTPException as exc:  # the body size limit, raised by its receive
                code = "request_too_large" if exc.status_code == 413 else None
                error = APIError(exc.status_code, str(exc.detail), code=code)
            else:
                if body is None:
                    return  # the client left (or the body deadline closed it) mid-body
                error = self._refusal()  # the state may have changed while the body came
        if error is not None:
            await error.response()(scope, receive, send)
            return
        slot = Slot(self.drainer)
        try:
            await self.app(scope, replay_body(body or b"", receive), releasing_send(slot, send))
        finally:
            slot.release()  # a stream that never reached its end (error, client gone)


class Slot:
    """One admitted request's place under the in-flight cap, given back exactly once."""

    def __init__(self, drainer: Drainer) -> None:
        self.drainer = drainer
        self.held = True
        drainer.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.drainer.in_flight -= 1


# The Responses stream events after which nothing follows (OpenAI's `error` event ends a
# stream too; a `response.failed` after it finds the slot already given back).
_RESPONSES_TERMINAL_EVENTS = (
    b"event: response.completed\n",
    b"event: response.incomplete\n",
    b"event: response.failed\n",
    b"event: error\n",
)
_SSE_DONE = b"data: [DONE]"


def _is_event_stream(message: Message) -> bool:
    for name, value in message.get("headers", ()):
        if name.lower() == b"content-type":
            return bytes(value).lower().startswith(b"text/event-stream")
    return False


def ends_stream(chunk: bytes) -> bool:
    """Whether a server-sent-events body chunk is the stream's last event: `data: [DONE]`
    (chat and completions) or a terminal Responses event."""
    return chunk[-16:].rstrip().endswith(_SSE_DONE) or chunk.startswith(_RESPONSES_TERMINAL_EVENTS)


def releasing_send(slot: Slot, send: Send) -> Send:
    """`send`, giving the slot back just before the response's last piece goes out.

    A client that sends its next request as soon as it has read the answer must find the
    slot free: released only when the app call returns (after the empty closing body message
    of a stream), it was still held for tens of milliseconds after `data: [DONE]` had
    reached the client, who got a spurious 429 at the cap. The app may still be finishing
    (closing generators, metrics); that work is not the engine's and needs no slot.
    """
    event_stream = False

    async def send_releasing(message: Message) -> None:
        nonlocal event_stream
        if message["type"] == "http.response.start":
            event_stream = _is_event_stream(message)
        elif message["type"] == "http.response.body":
            last = not message.get("more_body", False)
            if last or (event_stream and ends_stream(message.get("body", b""))):
                slot.release()
        await send(message)

    return send_releasing


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive channel that yields `body` once, then the real channel (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class StartupInterrupted(BaseException):
    """SIGTERM/SIGINT came while the engine was starting: start-up stops, the server exits.

    A BaseException, like KeyboardInterrupt: raised from the signal handler into whatever
    the engine factory is doing, it must not be caught by a broad `except Exception`.
    """


# A signal during start-up ends the process within this many seconds, whatever start-up was
# doing (tests/e2e/test_startup.py holds it to 5 s).
STARTUP_EXIT_DEADLINE_S = 3.5


def _freeze_descendants(me: Any, tree: dict[int, Any]) -> list[Any]:
    """SIGSTOP every descendant of `me` not in `tree` yet (adding it), until a scan finds
    nothing new: a stopped process starts no other. Returns the ones found this time."""
    import psutil

    new: list[Any] = []
    for _ in range(10):
        try:
            found = [p for p in me.children(recursive=True) if p.pid not in tree]
        except psutil.Error:  # one ended during the scan: scan again
            continue
        if not found:
            break
        for proc in found:
            tree[proc.pid] = proc
            new.append(proc)
            try:
                proc.suspend()
            except psutil.Error:
                pass
    return new


def kill_child_processes(grace_s: float = 1.0) -> int:
    """SIGTERM this process's descendants (vLLM's engine core, its workers, the compilers
    torch.compile runs), then SIGKILL the ones still alive after `grace_s`; returns how many.

    The tree is frozen (SIGSTOP) and collected before each round of signals: a parent that
    died first would otherwise orphan a child it had just started (a worker being spawned, a
    g++ of the compile), which then no longer shows among this process's descendants and
    outlives the server.
    """
    import psutil

    try:
        me = psutil.Process()
    except psutil.Error:
        return 0
    tree: dict[int, Any] = {}
    _freeze_descendants(me, tree)
    for proc in tree.values():
        try:
            proc.terminate()
            proc.resume()  # a stopped process handles its SIGTERM once continued
        except psutil.Error:
            pass
    alive = list(tree.values())
    if grace_s > 0:
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
    # What SIGTERM did not end, and whatever those started meanwhile, frozen first.
    late = _freeze_descendants(me, tree)
    for proc in [*alive, *late]:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(tree)


def _exit_now(sig: int, deadline_s: float) -> None:
    """The start-up deadline passed: kill what is left and leave without any clean-up."""
    logger.error("start-up did not stop within %.1fs of signal %d; exiting now", deadline_s, sig)
    kill_child_processes(grace_s=0)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stderr.flush()
    os._exit(128 + sig)


async def until_draining(drainer: Drainer, work: Awaitable[T], poll_s: float = 0.1) -> T:
    """Await `work` during start-up, cancelling it when a signal starts the drain."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if drainer.draining:
                raise StartupInterrupted("start-up interrupted by a signal")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before the usual shutdown begins."""

    def __init__(self, config: uvicorn.Config, drainer: Drainer) -> None:
        super().__init__(config)
        self.drainer = drainer
        self.startup_signal: int | None = None  # the signal that interrupted start-up

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.started:
            self._interrupt_startup(sig, frame)
            return
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

    def _interrupt_startup(self, sig: int, frame: FrameType | None) -> None:
        """A signal before the server serves: nothing to drain; stop the engine's start-up.

        uvicorn only looks at `should_exit` once start-up is over, which for vLLM can be
        minutes of loading and compiling. The engine's processes are killed (vLLM's start-up
        then fails at once), and when the factory is running on this thread the signal
        handler raises into it; an async warm-up sees the draining flag (`until_draining`).
        """
        first = not self.drainer.draining
        self.drainer.draining = True
        self.startup_signal = sig
        super().handle_exit(sig, frame)
        if first:
            # Whatever blocks below (a vLLM clean-up waiting on a process, a C call that
            # ignores the exception), the process ends by the deadline.
            deadline = threading.Timer(STARTUP_EXIT_DEADLINE_S, _exit_now, (sig, STARTUP_EXIT_DEADLINE_S))
            deadline.daemon = True
            deadline.start()
            logger.warning(
                "signal %d during start-up (%s): stopping the engine and exiting",
                sig,
                self.drainer.startup_phase,
            )
            killed = kill_child_processes()
            if killed:
                logger.info("killed %d engine process(es)", killed)
        if self.drainer.starting:
            self.drainer.starting = False
            raise StartupInterrupted(f"signal {sig} during engine start-up")

    async def _drain_then_exit(self, sig: int) -> None:
        idle = await self.drainer.wait_idle()
        if not idle:
            logger.warning("grace period over with %d request(s) in flight", self.drainer.in_flight)
        super().handle_exit(sig, None)
