"""Transport-level hardening (issue 13, items 4, 5, 6, 7, 12, 13), over real sockets.

- request deadlines: an idle socket, a slowloris head and a stalled body are closed by the
  server (408 where a request was begun), through a real uvicorn configured as `ssrl serve`
  configures it (`server.http_server.uvicorn_config`), with 1 s deadlines;
- stalled bodies hold no in-flight slot (`--max-in-flight`);
- `/metrics` label values stay in fixed sets whatever methods, paths and models clients send;
- the rate limiter keys on the authenticated key, however the header spells it;
- SIGTERM during engine start-up exits (a subprocess whose engine factory never finishes);
- debug logs of provider traffic carry no key, even when the provider echoes it.

No assertion on durations: outcomes only (closed by the server, 408, 200 not 429), with
generous client timeouts as bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import select
import signal
import socket
import string
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.engine.default_model import DEFAULT_MODEL_NAME
from server import redaction
from server.app import create_app
from server.http_server import uvicorn_config
from server.lifecycle import DrainingServer
from server.limits import RateLimitMiddleware
from server.metrics import KNOWN_METHODS
from server.settings import ServeSettings
from tests.scripted_engine import ScriptedEngine, script

KEY = "sk-transport-key-1"
CHAT = "/v1/chat/completions"
REPO = Path(__file__).resolve().parents[2]
CLIENT_BOUND_S = 20.0  # a client-side bound on every wait; never an assertion


def chat_body() -> bytes:
    return (
        b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], '
        b'"self_search": {"enabled": false}, "max_tokens": 2}' % DEFAULT_MODEL_NAME.encode()
    )


def make_app(**values: Any):
    settings: dict[str, Any] = {"api_key": [KEY], "warmup": False, "search": "none"}
    settings.update(values)
    engine = ScriptedEngine(responder=lambda call: script("ok"))
    return create_app(ServeSettings(**settings), engine_factory=lambda _: engine), ServeSettings(**settings)


@contextlib.contextmanager
def real_server(**values: Any) -> Iterator[tuple[str, int, Any]]:
    """The app behind a real uvicorn in a thread, configured as `ssrl serve` configures it."""
    values = {"head_timeout": 1.0, "body_timeout": 1.0, "keep_alive_timeout": 1, **values}
    app, settings = make_app(**values)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn_config(app, settings)
    config.log_level = "warning"
    server = DrainingServer(config, app.state.drainer)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + CLIENT_BOUND_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield "127.0.0.1", sock.getsockname()[1], app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=CLIENT_BOUND_S)


def read_until_closed(sock: socket.socket, bound_s: float = CLIENT_BOUND_S) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; (data, closed by the server)."""
    data = b""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.2)
        if not readable:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def head(path: str = CHAT, length: int | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}"]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ----- item 4: request deadlines -----------------------------------------------------------


def test_idle_sockets_are_closed_by_the_head_deadline() -> None:
    with real_server() as (_, port, _app):
        sockets = [connect(port) for _ in range(20)]
        try:
            deadline = time.monotonic() + CLIENT_BOUND_S  # one bound for all of them
            results = [read_until_closed(s, max(0.0, deadline - time.monotonic())) for s in sockets]
        finally:
            for s in sockets:
                s.close()
    # Closed by the server, without an answer: nothing of a request came.
    assert results == [(b"", True)] * 20


def test_slowloris_head_is_answered_408_and_closed() -> None:
    with real_server() as (_, port, _app):
        sock = connect(port)
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            data, closed = b"", False
            for _ in range(100):  # a byte every 0.1 s: each arrives well within any timeout
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    data, closed = read_until_closed(sock)
                    break
                try:
                    sock.sendall(b"a")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
        finally:
            sock.close()
    assert closed, "the server kept a slowloris head open"
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"code":"request_timeout"' in data.replace(b" ", b"")


def _requests_with_status(status: str) -> float:
    from tests.unit.test_metrics_truth import metric_sum

    return metric_sum("ssrl_requests_total", status=status)


def test_stalled_body_is_answered_408_and_closed() -> None:
    timed_out, client_closed = _requests_with_status("408"), _requests_with_status("499")
    with real_server() as (_, port, app):
        sock = connect(port)
        try:
            sock.sendall(head(length=500) + b"{")
            data, closed = read_until_closed(sock)
        finally:
            sock.close()
        assert app.state.drainer.in_flight == 0
    assert closed
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"connection: close" in data.lower()
    # The server has stopped, so every request's metrics are in: the deadline's close is a 408
    # (not the 499 of a client that left).
    assert _requests_with_status("408") == timed_out + 1
    assert _requests_with_status("499") == client_closed


def test_keep_alive_connection_closes_when_idle_and_serves_before() -> None:
    with real_server() as (_, port, _app):
        sock = connect(port)
        try:
            body = chat_body()
            sock.sendall(head(length=len(body)) + body)
            data, closed = read_until_closed(sock)
        finally:
            sock.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert closed  # after the answer, the idle kept-alive connection was closed


# ----- item 5: stalled bodies hold no in-flight slot ---------------------------------------


def test_stalled_bodies_do_not_take_in_flight_slots() -> None:
    from server.app import shared_metrics

    slots = 4
    gauge = shared_metrics().in_flight.labels(CHAT)
    with real_server(max_in_flight=slots, body_timeout=60.0) as (host, port, app):
        baseline = gauge._value.get()
        stalled = [connect(port) for _ in range(slots * 2)]
        try:
            for s in stalled:
                s.sendall(head(length=500) + b"{")
            # Wait until every stalled request is inside the app (the outermost middleware
            # counts it), waiting for the rest of its body.
            deadline = time.monotonic() + CLIENT_BOUND_S
            while gauge._value.get() < baseline + len(stalled) and time.monotonic() < deadline:
                time.sleep(0.02)
            reached = gauge._value.get() - baseline
            in_flight_while_stalled = app.state.drainer.in_flight
            response = httpx.post(
                f"http://{host}:{port}{CHAT}",
                content=chat_body(),
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                timeout=CLIENT_BOUND_S,
            )
        finally:
            for s in stalled:
                s.close()
    assert reached == len(stalled)
    assert in_flight_while_stalled == 0
    assert response.status_code == 200, response.text


# ----- item 6: bounded /metrics --------------------------------------------------------------


def _series(exposition: str, family: str) -> list[dict[str, str]]:
    labels = []
    for line in exposition.splitlines():
        if line.startswith(family + "{"):
            inner = line[len(family) + 1 : line.rindex("}")]
            labels.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', inner)))
    return labels


def test_metrics_labels_stay_bounded_under_junk_traffic() -> None:
    app, _ = make_app()
    rng = random.Random(13)
    routes = {getattr(r, "path", "") for r in app.routes} | {"unmatched"}

    def junk(n: int) -> str:
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(n))

    async def main() -> tuple[int, int, str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                before = len((await client.get("/metrics")).content)
                for i in range(500):
                    kind = i % 4
                    if kind == 0:  # a random method on a random path, no key
                        await client.request(junk(rng.randint(3, 40)), f"/{junk(12)}/{i}")
                    elif kind == 1:  # a random method on a real route
                        await client.request(junk(rng.randint(3, 40)), CHAT)
                    elif kind == 2:  # a random model, with the key
                        await client.post(
                            CHAT,
                            json={"model": junk(30), "messages": [{"role": "user", "content": "x"}]},
                            headers={"Authorization": f"Bearer {KEY}"},
                        )
                    else:  # a random model id in a route's path
                        await client.get(f"/v1/models/{junk(30)}", headers={"Authorization": f"Bearer {KEY}"})
                after = (await client.get("/metrics")).text
                return before, len(after.encode()), after

    before, after_size, exposition = asyncio.run(main())
    series = _series(exposition, "ssrl_requests_total")
    assert series
    for labels in series:
        assert labels["method"] in KNOWN_METHODS | {"other"}, labels
        assert labels["route"] in routes, labels
        assert re.fullmatch(r"\d{3}|\dxx|other", labels["status"]), labels
    # 500 requests of junk: a handful of new series at most, never one per request.
    assert after_size - before < 20_000, (before, after_size)
    for family in ("ssrl_request_duration_seconds_count", "ssrl_requests_in_flight"):
        assert {s["route"] for s in _series(exposition, family)} <= routes


# ----- item 7: one key, one bucket, however it is spelled ------------------------------------


def test_rate_limit_keys_on_the_authenticated_key_whatever_its_spelling() -> None:
    app, _ = make_app(rate_limit=6)
    rng = random.Random(7)

    async def main() -> list[int]:
        async with app.router.lifespan_context(app):
            from tests.unit.test_admission import find_middleware

            limiter = find_middleware(app, RateLimitMiddleware)
            limiter.clock = lambda: 1000.0  # frozen: no token comes back during the test
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
            statuses = []
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for i in range(40):
                    scheme = rng.choice(["bearer", "BEARER", "Bearer", "bEaReR"])
                    spaces = " " * rng.randint(1, 10)
                    trailing = " " * rng.randint(0, 3) if i % 2 else ""
                    response = await client.get(
                        "/v1/models", headers={"Authorization": f"{scheme}{spaces}{KEY}{trailing}"}
                    )
                    statuses.append(response.status_code)
            return statuses

    statuses = asyncio.run(main())
    assert statuses.count(200) == 1, statuses  # the burst of one, then 429s
    assert statuses.count(429) == 39, statuses


def test_rate_limit_without_keys_ignores_presented_tokens() -> None:
    # Without keys any token passes auth, so tokens are not identities: the address is.
    app, _ = make_app(rate_limit=6, api_key=[])

    async def main() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("10.1.1.1", 1))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return [
                    (
                        await client.get("/v1/models", headers={"Authorization": f"Bearer junk-{i}"})
                    ).status_code
                    for i in range(10)
                ]

    statuses = asyncio.run(main())
    assert statuses.count(200) == 1, statuses


# ----- item 12: SIGTERM during engine start-up ---------------------------------------------

_SLOW_START = textwrap.dedent(
    """
    import subprocess, sys
    from server.http_server import serve
    from server.settings import ServeSettings

    def factory(settings):
        # Like vLLM: the engine core is a child process, and start-up waits on it (here forever).
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("ENGINE-CHILD", child.pid, flush=True)
        child.wait()
        raise RuntimeError("engine core died during start-up")

    settings = ServeSettings(port=int(sys.argv[1]), warmup=False, search="none", log_level="info")
    sys.exit(serve(settings, engine_factory=factory))  # as `ssrl serve` runs
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its dead parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_engine_start_up_exits(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_START, str(_free_port())],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    child = None
    try:
        deadline = time.monotonic() + 60
        while child is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("ENGINE-CHILD"):
                child = int(line.split()[1])
        assert child is not None, "the engine factory never ran"
        time.sleep(0.5)  # well inside the (endless) start-up
        sent = time.monotonic()
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)  # a bound, not the assertion
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"exited {elapsed:.2f}s after signal {int(sig)}, rc {proc.returncode}")
    assert proc.returncode == 128 + int(sig), output[-2000:]
    assert "during start-up" in output, output[-2000:]
    # The engine's process went with it.
    gone_deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < gone_deadline:
        time.sleep(0.05)
    assert not _alive(child)


# ----- item 13: no key in debug logs of provider traffic -----------------------------------


@pytest.fixture
def redaction_installed() -> Iterator[None]:
    """Install the process-wide redaction for one test, then restore logging as it was."""
    factory = logging.getLogRecordFactory()
    installed = redaction._installed
    redaction._installed = None
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)
        redaction._installed = installed


def test_debug_logs_of_provider_traffic_carry_no_key(
    redaction_installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    from router.search.providers.serper import SerperBackend
    from tests.fake_providers import FAKE_KEYS, FakeProviders, respond, running_fake

    key = FAKE_KEYS["serper"]
    fake = FakeProviders()
    echo = {"X-Echo-Key": key, "X-Api-Key": key, "Authorization": f"Bearer {key}"}
    answer = {"organic": [{"title": f"t {key}", "link": "http://x", "snippet": key}]}

    async def search(base_url: str) -> None:
        backend = SerperBackend(key, base_url=base_url)
        try:
            await backend.search("mona lisa", 3)
        finally:
            await backend.aclose()

    settings = ServeSettings(api_key=[KEY], engine_api_key="engine-key-123", warmup=False, search="none")
    with running_fake(fake):
        # Without redaction the key reaches the log (httpcore prints the echoed headers).
        with caplog.at_level(logging.DEBUG):
            fake.script(respond(answer, headers=echo))
            asyncio.run(search(fake.url("serper")))
        leaked = key in caplog.text
        caplog.clear()

        redaction.install_redaction([*redaction.settings_secrets(settings), key])
        with caplog.at_level(logging.DEBUG):
            fake.script(respond(answer, headers=echo))
            asyncio.run(search(fake.url("serper")))
            logging.getLogger("ssrl.test").debug(
                "presented %s; headers %s", f"Bearer {KEY}", {"x-api-key": "unconfigured-secret"}
            )
            logging.getLogger("ssrl.test").info("engine key %s", "engine-key-123")
    assert leaked, "the test does not reach httpcore's debug logs"
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert any(r.name.startswith("httpcore") for r in caplog.records)
    for secret in (key, KEY, "unconfigured-secret", "engine-key-123"):
        assert secret not in text, secret
    assert "***" in text


def test_redaction_keeps_the_arguments_formatters_unpack() -> None:
    """uvicorn's access formatter unpacks `record.args`; redaction must not drop them."""
    import logging

    from uvicorn.logging import AccessFormatter

    from server.redaction import SecretRedactor

    redactor = SecretRedactor(["sk-secret-123"])
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/models?key=sk-secret-123", "1.1", 200),
        None,
    )
    redactor.filter(record)
    assert isinstance(record.args, tuple) and len(record.args) == 5
    line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(record)
    assert "sk-secret-123" not in line and "GET /v1/models" in line and "200" in line
