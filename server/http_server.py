"""How `ssrl serve` runs the app: uvicorn with transport deadlines, log redaction, drain.

uvicorn's h11 protocol has one timer, the keep-alive one, armed only after a response: a
socket that connects and never sends a byte, a head sent one byte at a time (slowloris), or
a body that stops half-way each held a connection (and an fd) forever. `DeadlineH11Protocol`
adds two deadlines, neither extended by data arriving:

- head: from the connection (or the first byte of the next request on a kept-alive one) to
  the end of the request head, `--head-timeout`;
- body: from the end of the head to the end of the body, `--body-timeout`.

Past either the server closes the socket, answering 408 first when the client sent part of a
request and no response has begun. Idle kept-alive connections close after
`--keep-alive-timeout` (uvicorn's own timer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import APIError
from server.metrics import BODY_DEADLINE_EXPIRED
from server.settings import ServeSettings

logger = logging.getLogger(__name__)

DEFAULT_HEAD_TIMEOUT_S = 30.0
DEFAULT_BODY_TIMEOUT_S = 60.0


class ServeConfig(uvicorn.Config):
    """uvicorn's Config plus the request deadlines `DeadlineH11Protocol` reads."""

    def __init__(
        self,
        app: Any,
        *,
        head_timeout: float = DEFAULT_HEAD_TIMEOUT_S,
        body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout


def _timeout_response(message: str) -> bytes:
    body = json.dumps(APIError(408, message, code="request_timeout").body()).encode()
    head = (
        b"HTTP/1.1 408 Request Timeout\r\n"
        b"content-type: application/json\r\n"
        b"connection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head and one on the body."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = float(getattr(self.config, "head_timeout", DEFAULT_HEAD_TIMEOUT_S))
        self.body_timeout = float(getattr(self.config, "body_timeout", DEFAULT_BODY_TIMEOUT_S))
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "head" or "body" while a deadline runs

    # ----- the deadline timer ------------------------------------------------------------

    def _arm(self, phase: str) -> None:
        self._disarm()
        seconds = self.head_timeout if phase == "head" else self.body_timeout
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._phase = None

    def _update_deadline(self) -> None:
        """Start, keep or stop the deadline from where the request stands now."""
        if self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.timeout_keep_alive_task is not None:
                self._disarm()  # idle between requests: the keep-alive timeout applies
            elif self._phase != "head":
                self._arm("head")
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        else:
            self._disarm()  # the request is all here (the app owns the time), or closed

    def _expired(self, phase: str) -> None:
        self._deadline = None
        self._phase = None
        if self.transport is None or self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        seconds = self.head_timeout if phase == "head" else self.body_timeout
        partial = bool(self.conn.trailing_data[0]) if phase == "head" else True
        cycle = self.cycle if phase == "body" else None
        logger.info("closing connection from %s: no complete request %s within %gs", client, phase, seconds)
        if cycle is not None:
            # The app may still be waiting for the body: it gets a disconnect, and nothing it
            # sends from now on reaches the socket.
            answer = not cycle.response_started
            # The metrics count 408, not a client's 499 (an ssrl key in the ASGI scope).
            cycle.scope[BODY_DEADLINE_EXPIRED] = True  # type: ignore[literal-required]
            cycle.disconnected = True
            cycle.message_event.set()
        else:
            answer = partial
        if answer:
            self.transport.write(
                _timeout_response(f"Request {phase} not received within {seconds:g} seconds.")
            )
        self.transport.close()

    # ----- uvicorn's hooks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._update_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        self._update_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, settings: ServeSettings) -> uvicorn.Config:
    """How `ssrl serve` runs uvicorn."""
    # h11 stops reading a request head at --max-header-bytes and carries the deadlines;
    # httptools (uvicorn's "auto" choice) buffers a head of any size and has neither.
    http: type[asyncio.Protocol] | str = (
        DeadlineH11Protocol if settings.http_parser == "h11" else settings.http_parser
    )
    return ServeConfig(
        app,
        head_timeout=settings.head_timeout,
        body_timeout=settings.body_timeout,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_keep_alive=settings.keep_alive_timeout,
        http=http,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # The drain already waited for requests; this bounds what is left (connections).
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
    )


def serve(settings: ServeSettings, engine_factory: Any = None) -> int:
    """`ssrl serve`: logging (secrets redacted), the app, uvicorn; returns the exit code."""
    from server.app import create_app
    from server.lifecycle import DrainingServer
    from server.redaction import install_redaction, settings_secrets

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_redaction(settings_secrets(settings))
    app = create_app(settings) if engine_factory is None else create_app(settings, engine_factory)
    server = DrainingServer(uvicorn_config(app, settings), app.state.drainer)
    # uvicorn takes SIGTERM/SIGINT over (DrainingServer: a signal during start-up stops it
    # within seconds) and restores these defaults when it is done.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.run()
    except SystemExit:  # uvicorn's exit when start-up failed
        if server.startup_signal is None:
            raise
    if server.startup_signal is not None:
        # Interrupted start-up: the engine's processes are gone; skip the interpreter's
        # teardown, which after importing torch and vLLM spent ~12 s garbage-collecting.
        logger.info("start-up interrupted by signal %d; exiting", server.startup_signal)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + server.startup_signal)
    return 0
