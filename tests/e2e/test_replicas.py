"""Two replicas behave as one server (issue 36): two `ssrl serve` processes in remote engine
mode in front of the session server's engine, sharing a real redis-server (`--redis-url`).

A key's rate limit and its daily search budget hold across both replicas together; with Redis
stopped mid-test both replicas keep answering, each on its own state, and say so in /metrics
and /health. The search backend is the loopback fake of Serper (tests/fake_providers.py) under
policy `always`, so every search the loop makes is an external call the fake counts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.search.allowance import BUDGET_FALLBACK, BUDGET_NOTE
from tests.conftest import RunningServer, _stop, start_router
from tests.fake_providers import FAKE_SECRETS, FakeProviders, running_fake
from tests.redis_server import REDIS, RedisServer

pytestmark = pytest.mark.engine

RATE_KEY = "sk-replicas-rate"  # the server's default limit: --rate-limit 6 (a burst of one)
BUDGET_KEY = "sk-replicas-budget"  # keys file: a loose rate, a search budget of 1 a day
RATE_LIMIT = 6.0
BURST = 1  # server.token_bucket.RateLimit.of(6).burst


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it as root)")
    running = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviders]:
    providers = FakeProviders()
    with running_fake(providers):
        yield providers


@pytest.fixture(scope="module")
def replicas(
    server: RunningServer, redis: RedisServer, fake: FakeProviders, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[RunningServer]]:
    folder = tmp_path_factory.mktemp("replicas")
    keys_file = folder / "keys.json"
    keys_file.write_text(
        json.dumps(
            {"keys": {BUDGET_KEY: {"name": "budgeted", "rate_limit": 6000, "search_budget_per_day": 1}}}
        )
    )
    flags = [
        "--api-key",
        BUDGET_KEY,  # a second accepted key, beside the one start_router passes
        "--engine-api-key",
        server.api_key,
        "--redis-url",
        redis.url,
        "--rate-limit",
        str(RATE_LIMIT),
        "--keys-file",
        str(keys_file),
        "--search",
        "serper",
        "--search-option",
        f"serper.base_url={fake.url('serper')}",
        "--search-policy",
        "always",
        "--no-warmup",
    ]
    # `server` is the engine: the replicas route in front of its /v1, so no second engine starts.
    engine = RunningServer(server.base_url, server.api_key, None, None)
    started: list[RunningServer] = []
    try:
        for name in ("a", "b"):
            started.append(
                start_router(
                    engine,
                    RATE_KEY,
                    folder / f"replica-{name}.log",
                    *flags,
                    env={"SERPER_API_KEY": FAKE_SECRETS["SERPER_API_KEY"]},
                )
            )
        yield started
    finally:
        for replica in started:
            _stop(replica.process)  # type: ignore[arg-type]


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(replica: RunningServer, key: str = BUDGET_KEY) -> httpx.Response:
    return httpx.post(
        replica.base_url + "/v1/chat/completions",
        json={
            "model": model_of(replica),
            "messages": [{"role": "user", "content": "Who painted the Mona Lisa?"}],
            "max_tokens": 96,
            "temperature": 0,
        },
        headers=headers(key),
        timeout=300,
    )


def model_of(replica: RunningServer) -> str:
    listed = httpx.get(replica.base_url + "/v1/models", headers=headers(BUDGET_KEY), timeout=30)
    assert listed.status_code == 200, listed.text
    return str(listed.json()["data"][0]["id"])


def trace_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert isinstance(choice["message"]["content"], str)
    return dict(choice["self_search"])


def metric(replica: RunningServer, name: str, **labels: str) -> float | None:
    text = httpx.get(replica.base_url + "/metrics", timeout=30).text
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def log_tail(replica: RunningServer) -> str:
    return replica.log_tail(40)


def test_a_keys_rate_limit_holds_across_both_replicas(replicas: list[RunningServer]) -> None:
    started = time.monotonic()
    answers = [
        httpx.get(replicas[i % 2].base_url + "/v1/models", headers=headers(RATE_KEY), timeout=30)
        for i in range(20)
    ]
    elapsed = time.monotonic() - started
    passed = [r for r in answers if r.status_code == 200]
    limited = [r for r in answers if r.status_code == 429]
    assert len(passed) + len(limited) == 20, [r.status_code for r in answers]
    # The burst, plus what the bucket refilled while the burst ran (a token per 10 s): one
    # bucket for both replicas, where two processes would each let their own burst through.
    allowance = BURST + math.floor(elapsed * RATE_LIMIT / 60)
    assert 1 <= len(passed) <= allowance, (len(passed), elapsed)
    for response in limited:
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(response.headers["Retry-After"]) <= 10
    # Both replicas refused: the second one found the bucket the first had emptied.
    refused_by = {str(r.url).rsplit("/v1/", 1)[0] for r in limited}
    assert refused_by == {replica.base_url for replica in replicas}


def test_a_keys_search_budget_holds_across_both_replicas(
    replicas: list[RunningServer], fake: FakeProviders
) -> None:
    a, b = replicas
    fake.reset()
    first = trace_of(ask(a))
    (search,) = first["searches"]
    assert (search["decision"], search["fallback"]) == ("external", None), (search, log_tail(a))
    assert len(fake.requests_for("serper")) == 1
    # The budget (1 a day) is spent: on the other replica, and on the first again, the loop
    # self-fills, says so, and the request still answers.
    for replica in (b, a):
        trace = trace_of(ask(replica))
        (search,) = trace["searches"]
        assert (search["decision"], search["fallback"]) == ("external", BUDGET_FALLBACK), search
        assert BUDGET_NOTE in trace["notes"]
        assert trace["external_calls"] == 0
    assert len(fake.requests_for("serper")) == 1  # no further paid call, from either replica
    usage = httpx.get(b.base_url + "/v1/search_budget", headers=headers(BUDGET_KEY), timeout=30).json()
    assert (usage["name"], usage["limit"], usage["used"], usage["remaining"]) == ("budgeted", 1, 1, 0)
    assert usage["shared"] is True
    searched = httpx.get(
        b.base_url + "/v1/search", params={"q": "x"}, headers=headers(BUDGET_KEY), timeout=30
    )
    assert searched.status_code == 429 and searched.json()["error"]["code"] == "search_budget_exceeded"
    for replica in replicas:
        assert (metric(replica, "ssrl_search_budget_total", result="denied") or 0) >= 1


def test_with_redis_stopped_both_replicas_keep_answering(
    replicas: list[RunningServer], redis: RedisServer
) -> None:
    for replica in replicas:
        assert metric(replica, "ssrl_shared_state_up", store="redis") == 1.0
    redis.stop()
    try:
        for replica in replicas:
            trace = trace_of(ask(replica))
            assert len(trace["searches"]) == 1
            models = httpx.get(replica.base_url + "/v1/models", headers=headers(BUDGET_KEY), timeout=30)
            assert models.status_code == 200, models.text
            health = httpx.get(replica.base_url + "/health", timeout=30)
            assert health.status_code == 200
            assert health.json()["shared_state"]["redis"] == "down"
            # The loss of sharing is in the metrics.
            assert metric(replica, "ssrl_shared_state_up", store="redis") == 0.0
            local = metric(replica, "ssrl_shared_state_local_total", operation="rate_limit")
            assert local is not None and local >= 1
            assert "redis failed" in Path(replica.log_path).read_text()  # type: ignore[arg-type]
    finally:
        redis.start()  # the same port: nothing else of the session depends on it, but tidy
