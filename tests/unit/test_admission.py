"""Admission control on a scripted engine: what the server refuses before the engine works.

--max-in-flight (429 + Retry-After past the cap, admitted again once requests finish),
--rate-limit per API key (429 + Retry-After; other keys and clients unaffected; keys kept only
as digests), --max-n / --max-tokens-limit (400 naming the field), draining (503 + Retry-After),
--max-header-bytes (431 from a real uvicorn, as `ssrl serve` runs it), and the constant-time
key comparison. The body-size limit (413) is covered in tests/unit/test_http_layer.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from router.engine.default_model import DEFAULT_MODEL_NAME
from server import auth
from server.app import create_app
from server.auth import KeyChecker
from server.lifecycle import DrainingServer
from server.limits import RateLimitMiddleware
from server.settings import ServeSettings
from tests.scripted_engine import ScriptedEngine, script

KEY = "sk-admission-one"
OTHER_KEY = "sk-admission-two"
MODEL = DEFAULT_MODEL_NAME
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "self_search": {"enabled": False},
        **fields,
    }


def make_app(engine: ScriptedEngine, **settings: Any):
    values: dict[str, Any] = {"api_key": [KEY, OTHER_KEY], "warmup": False, "search": "none"}
    values.update(settings)
    return create_app(ServeSettings(**values), engine_factory=lambda _: engine)


def run(
    app, body: Callable[[httpx.AsyncClient], Awaitable[Any]], client: tuple[str, int] = ("127.0.0.1", 123)
) -> Any:
    """`body(client)` against `app` in process, its lifespan running."""

    async def main() -> Any:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=client)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test", headers=bearer(KEY), timeout=30
            ) as http:
                return await body(http)

    return asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def assert_error(
    response: httpx.Response,
    status: int,
    *,
    code: str | None = None,
    param: str | None = None,
    type_: str | None = None,
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    if type_ is not None:
        assert error["type"] == type_, error
    return error


def find_middleware(app, kind: type) -> Any:
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    node = app.middleware_stack
    while node is not None:
        if isinstance(node, kind):
            return node
        node = getattr(node, "app", None)
    raise AssertionError(f"no {kind.__name__} in the middleware stack")


# ----- --max-in-flight ---------------------------------------------------------------------


def test_in_flight_cap_answers_429_then_admits_again() -> None:
    # Slow tokens hold two requests in flight until the test lets them finish (delay -> 0).
    engine = ScriptedEngine(responder=lambda call: script("z" * 400), delay=0.02)
    app = make_app(engine, max_in_flight=2)
    drainer = app.state.drainer

    async def body(client: httpx.AsyncClient):
        held = [asyncio.create_task(client.post(CHAT, json=chat(max_tokens=400))) for _ in range(2)]
        assert await until(lambda: drainer.in_flight == 2 and len(engine.calls) == 2)
        refused = await client.post(CHAT, json=chat(max_tokens=4))
        refused_completion = await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x"})
        probes = [await client.get(p) for p in ("/health", "/ready", "/metrics")]
        calls_at_cap = len(engine.calls)
        engine.delay = 0.0
        finished = await asyncio.gather(*held)
        assert await until(lambda: drainer.in_flight == 0)
        again = await client.post(CHAT, json=chat(max_tokens=4))
        return refused, refused_completion, probes, calls_at_cap, finished, again

    refused, refused_completion, probes, calls_at_cap, finished, again = run(app, body)
    for response in (refused, refused_completion):
        assert_error(response, 429, code="server_overloaded", type_="rate_limit_error")
        assert response.headers["Retry-After"] == "1"
    assert calls_at_cap == 2  # the refused requests never reached the engine
    assert [p.status_code for p in probes] == [200, 200, 200]  # probes are not counted
    assert [r.status_code for r in finished] == [200, 200]
    assert again.status_code == 200, again.text


# ----- --rate-limit ------------------------------------------------------------------------


def test_rate_limit_per_key_with_retry_after_and_digest_buckets() -> None:
    engine = ScriptedEngine(responder=lambda call: script("ok"))
    # 6 a minute: a burst of 1, then one token every 10 s.
    app = make_app(engine, rate_limit=6)
    limiter = find_middleware(app, RateLimitMiddleware)
    now = [1000.0]
    limiter.clock = lambda: now[0]

    async def body(client: httpx.AsyncClient):
        first = await client.post(CHAT, json=chat(max_tokens=2))
        limited = await client.post(CHAT, json=chat(max_tokens=2))
        models_limited = await client.get("/v1/models")
        other = await client.post(CHAT, json=chat(max_tokens=2), headers=bearer(OTHER_KEY))
        probes = [await client.get(p) for p in ("/health", "/metrics")]
        now[0] += float(limited.headers["Retry-After"])
        later = await client.post(CHAT, json=chat(max_tokens=2))
        return first, limited, models_limited, other, probes, later

    first, limited, models_limited, other, probes, later = run(app, body)
    assert first.status_code == 200, first.text
    for response in (limited, models_limited):
        assert_error(response, 429, code="rate_limit_exceeded", type_="rate_limit_error")
        assert response.headers["Retry-After"] == "10"
    assert other.status_code == 200, other.text  # another key has its own bucket
    assert [p.status_code for p in probes] == [200, 200]
    assert later.status_code == 200, later.text  # admitted again after Retry-After
    # Buckets are keyed by SHA-256 digests of the authenticated key, never the key.
    expected = {hashlib.sha256(k.encode()).digest() for k in (KEY, OTHER_KEY)}
    assert set(limiter.buckets) == expected
    for bucket in limiter.buckets:
        assert len(bucket) == 32
        assert KEY.encode() not in bucket and OTHER_KEY.encode() not in bucket


def test_rate_limit_without_keys_is_per_client_address() -> None:
    engine = ScriptedEngine(responder=lambda call: script("ok"))
    app = make_app(engine, rate_limit=6, api_key=[])

    async def from_address(address: str) -> list[int]:
        transport = httpx.ASGITransport(app=app, client=(address, 4242))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.post(CHAT, json=chat(max_tokens=2))).status_code for _ in range(2)]

    async def main() -> tuple[list[int], list[int]]:
        async with app.router.lifespan_context(app):
            return await from_address("10.0.0.1"), await from_address("10.0.0.2")

    first, second = asyncio.run(main())
    assert first == [200, 429]
    assert second == [200, 429]  # a second address is not limited by the first


# ----- --max-n and --max-tokens-limit ------------------------------------------------------


def test_max_n_and_max_tokens_limit_are_400_with_the_param() -> None:
    engine = ScriptedEngine(responder=lambda call: script("ok"))
    app = make_app(engine, max_n=2, max_tokens_limit=64)
    over = [
        (CHAT, chat(n=3), "n"),
        (CHAT, chat(n=3, stream=True), "n"),
        (CHAT, chat(n=3, self_search={"enabled": True}), "n"),
        (CHAT, chat(max_tokens=65), "max_tokens"),
        (CHAT, chat(max_completion_tokens=65), "max_completion_tokens"),  # the field sent
        (CHAT, chat(max_tokens=65, self_search={"policy": "always"}), "max_tokens"),
        # n counts per prompt: 2 prompts x n=2 are 4 sequences.
        (COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"], "n": 2}, "n"),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": 65}, "max_tokens"),
    ]
    at_limit = [
        (CHAT, chat(n=2, max_tokens=64)),
        (COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 64}),
    ]

    async def body(client: httpx.AsyncClient):
        refused = [await client.post(path, json=payload) for path, payload, _ in over]
        calls = len(engine.calls)
        accepted = [await client.post(path, json=payload) for path, payload in at_limit]
        return refused, calls, accepted

    refused, calls, accepted = run(app, body)
    for response, (_, _, param) in zip(refused, over, strict=True):
        assert_error(response, 400, code="invalid_value", param=param)
    assert calls == 0
    assert [r.status_code for r in accepted] == [200, 200]


# ----- draining ----------------------------------------------------------------------------


def test_draining_answers_503_with_retry_after_and_keeps_probes() -> None:
    engine = ScriptedEngine(responder=lambda call: script("ok"))
    app = make_app(engine)

    async def body(client: httpx.AsyncClient):
        app.state.drainer.draining = True
        return {
            "chat": await client.post(CHAT, json=chat()),
            "completion": await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x"}),
            "models": await client.get("/v1/models"),
            "retrieve": await client.post("/retrieve", json={"queries": ["q"]}),
            "health": await client.get("/health"),
            "ready": await client.get("/ready"),
            "metrics": await client.get("/metrics"),
        }

    answers = run(app, body)
    for name in ("chat", "completion", "models", "retrieve"):
        assert_error(answers[name], 503, code="server_shutting_down", type_="service_unavailable_error")
        assert answers[name].headers["Retry-After"] == "5"
    assert answers["health"].status_code == 200  # liveness holds while draining
    assert answers["ready"].status_code == 503 and answers["ready"].json() == {"status": "draining"}
    assert answers["metrics"].status_code == 200
    assert engine.calls == []


# ----- --max-header-bytes, through uvicorn as `ssrl serve` runs it -------------------------

HEADER_LIMIT = 4096


@pytest.fixture(scope="module")
def uvicorn_server() -> Iterator[str]:
    """The app behind a real uvicorn in a thread, configured as clients/cli.py configures it."""
    engine = ScriptedEngine(responder=lambda call: script("ok"))
    app = make_app(engine, max_header_bytes=HEADER_LIMIT)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=HEADER_LIMIT,
        timeout_graceful_shutdown=1,
    )
    server = DrainingServer(config, app.state.drainer)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_serve_parses_with_h11_bounded_by_the_header_limit() -> None:
    # httptools (uvicorn's "auto" choice when installed) has no bound on a request head.
    from server.http_server import uvicorn_config

    config = uvicorn_config(create_app, ServeSettings(max_header_bytes=4096, warmup=False))
    from uvicorn.protocols.http.h11_impl import H11Protocol

    assert isinstance(config.http, type) and issubclass(config.http, H11Protocol)
    assert config.h11_max_incomplete_event_size == 4096


@pytest.mark.parametrize("size", [HEADER_LIMIT + 100, 8 * HEADER_LIMIT])
def test_header_over_the_limit_is_431(uvicorn_server: str, size: int) -> None:
    with httpx.Client(base_url=uvicorn_server, timeout=10) as client:
        fine = client.get("/v1/models", headers={**bearer(KEY), "X-Pad": "a" * 512})
        big = client.get("/v1/models", headers={**bearer(KEY), "X-Pad": "a" * size})
        probe = client.get("/health", headers={"X-Pad": "a" * size})
    assert fine.status_code == 200, fine.text
    assert_error(big, 431, code="request_header_too_large")
    assert_error(probe, 431)


def test_huge_header_is_refused_by_the_transport(uvicorn_server: str) -> None:
    # Far past one socket read: h11 gives up on the head (400, or the connection is reset
    # while the client still writes); never a 2xx, never a hang, and the server lives on.
    try:
        with httpx.Client(base_url=uvicorn_server, timeout=10) as client:
            status = client.get("/health", headers={"X-Pad": "a" * 2_000_000}).status_code
    except httpx.TransportError:
        status = None
    assert status in (None, 400, 431)
    assert httpx.get(uvicorn_server + "/health", timeout=10).status_code == 200


# ----- API keys: constant-time comparison --------------------------------------------------


def test_key_checker_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = ["sk-first", "sk-second-longer", "sk-3"]
    checker = KeyChecker(keys)
    for presented, accepted in [
        ("sk-first", True),
        ("sk-3", True),
        ("sk-nope", False),
        ("", False),
        (None, False),
        ("x" * 10_000, False),
    ]:
        compared.clear()
        assert checker.accepts(presented) is accepted
        # Every configured key is compared, whatever matched and wherever it sits...
        assert len(compared) == len(keys)
        # ...as fixed-length digests, so neither a key's length nor its prefix leaks.
        assert {len(a) for a, _ in compared} | {len(b) for _, b in compared} == {32}
        assert all(not presented or presented.encode() not in a + b for a, b in compared)
