"""What replicas share through Redis (issue 36): per-key rate limits and search budgets.

The pure parts (token-bucket arithmetic, the budget's day and ledger, the keys file) on their
own; the Lua scripts against a real redis-server (skipped where it is not installed), held to
the same answers as the pure code; two in-process apps standing in for two replicas; and Redis
going away (fail open to each replica's own state, said in the metrics and /health). The
two-replica test over real processes is tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import server.app
from router.engine.default_model import DEFAULT_MODEL_NAME
from router.loop import LoopConfig, SelfSearchLoop
from router.policies import AlwaysPolicy
from router.search.allowance import BUDGET_FALLBACK, BUDGET_NOTE
from router.search.base import Document
from router.search.cache import SearchCache
from router.search.service import SearchService
from server.app import create_app
from server.budget_ledger import DAY_S, BudgetLedger, verdict, window_at
from server.key_overrides import DEFAULT, key_digest_of, load_key_overrides, parse_key_overrides
from server.metrics import HTTPMetrics
from server.search_budget import SearchBudget
from server.settings import ServeSettings
from server.shared_state import LinkHealth, SharedState, SharedStateUnavailable
from server.token_bucket import RateLimit, take
from tests.redis_server import REDIS, RedisServer, free_port
from tests.scripted_engine import Call, Script, ScriptedEngine, script

KEY, OTHER = "sk-replica-one", "sk-replica-two"
DIGEST = hashlib.sha256(KEY.encode()).digest()
MODEL = DEFAULT_MODEL_NAME
CHAT = "/v1/chat/completions"


# ----- token bucket arithmetic (pure) ---------------------------------------------------------


def test_rate_limit_defaults_to_a_tenth_of_a_minute_as_burst() -> None:
    assert RateLimit.of(6) == RateLimit(6, 1.0)  # never below one request
    assert RateLimit.of(120) == RateLimit(120, 20.0)
    assert RateLimit.of(60, burst=3).burst == 3
    assert RateLimit.of(6).idle_ttl_s == 11  # 1 token at 0.1/s, and a second to spare
    with pytest.raises(ValueError):
        RateLimit.of(0)


def test_take_spends_the_burst_then_waits_for_the_refill() -> None:
    limit = RateLimit.of(60, burst=2)  # one token a second
    tokens, wait = take(None, 0.0, 100.0, limit)
    assert (tokens, wait) == (1.0, 0.0)
    tokens, wait = take(tokens, 100.0, 100.0, limit)
    assert (tokens, wait) == (0.0, 0.0)
    tokens, wait = take(tokens, 100.0, 100.25, limit)
    assert tokens == pytest.approx(0.25) and wait == pytest.approx(0.75)
    # Never above the burst, however long the bucket sat.
    assert take(0.0, 100.0, 10_000.0, limit) == (1.0, 0.0)
    # A clock that went back refills nothing.
    assert take(0.5, 100.0, 50.0, limit) == (0.5, 0.5)


# ----- the budget's day and the local ledger (pure) -------------------------------------------


def test_budget_window_is_the_utc_day() -> None:
    window = window_at(1_700_000_000.0)  # 2023-11-14T22:13:20Z
    assert window.day == "2023-11-14"
    assert window.resets_at == 1_700_006_400  # 2023-11-15T00:00:00Z
    assert window.seconds_left(1_700_000_000.0) == 6400
    assert window_at(window.resets_at).day == "2023-11-15"
    assert window_at(window.resets_at - 0.001).day == "2023-11-14"
    assert window.ttl_s == 2 * DAY_S


def test_budget_verdict_and_ledger() -> None:
    assert verdict(0, 2).allowed and verdict(1, 2).used == 2
    assert not verdict(2, 2).allowed and verdict(2, 2).used == 2
    assert not verdict(0, 0).allowed  # a budget of 0: no external search at all
    ledger = BudgetLedger()
    assert [ledger.take(b"k", "d1", 2).allowed for _ in range(3)] == [True, True, False]
    assert ledger.used(b"k", "d1") == 2 and ledger.used(b"k", "d2") == 0  # a new day starts at 0
    ledger.refund(b"k", "d1")
    assert ledger.take(b"k", "d1", 2).allowed
    for _ in range(5):
        ledger.refund(b"other", "d1")
    assert ledger.used(b"other", "d1") == 0  # never below zero
    ledger.count(b"other", "d1")
    assert ledger.used(b"other", "d1") == 1
    small = BudgetLedger(max_clients=2)
    for client in (b"a", b"b", b"c"):
        small.take(client, "d", 5)
    assert small.used(b"a", "d") == 0  # bounded: the oldest key was dropped


# ----- the keys file ---------------------------------------------------------------------------


def test_keys_file_by_digest_or_key_with_defaults_and_nulls() -> None:
    other_digest = hashlib.sha256(OTHER.encode()).hexdigest()
    overrides = parse_key_overrides(
        "{"
        '"keys": {'
        f'"{KEY}": {{"name": "team-a", "rate_limit": 120}},'
        f'"sha256:{other_digest.upper()}": {{"search_budget_per_day": null, "rate_limit": null}}'
        "}}"
    )
    one = overrides.get(DIGEST)
    assert one.name == "team-a" and one.rate_limit == 120 and one.search_budget_per_day is DEFAULT
    assert one.rate_limit_or(6) == 120 and one.budget_or(50) == 50  # left out: the server's default
    two = overrides.get(hashlib.sha256(OTHER.encode()).digest())
    assert two.rate_limit_or(6) is None and two.budget_or(50) is None  # null: unlimited
    assert overrides.get(b"\0" * 32).budget_or(50) == 50  # not in the file
    assert overrides.any_rate_limit()
    assert overrides.label(DIGEST) == "team-a"
    assert overrides.label(b"\x01" * 32) == "sha256:" + "01" * 6
    assert key_digest_of(f"sha256:{other_digest}") == bytes.fromhex(other_digest)
    assert not parse_key_overrides('{"keys": {}}').any_rate_limit()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{nope", "is not JSON (line 1, column 2)"),
        ('{"keys": {"sk-secret-123": {"rate_limit": 0}}}', "entry 1.rate_limit"),
        ('{"keys": {"sk-secret-123": {"search_budget_per_day": -1}}}', "entry 1.search_budget_per_day"),
        ('{"keys": {"sk-secret-123": {"budget": 3}}}', "entry 1.budget: Extra inputs"),
        ('{"keys": {"sk-secret-123": {"name": "a b"}}}', "entry 1.name"),
        ('{"keys": {" ": {}}}', "entry 1: an empty key"),
        ('{"key": {}}', "keys: Field required"),
    ],
)
def test_a_bad_keys_file_says_where_without_the_key(text: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_key_overrides(text)
    assert words in str(caught.value)
    assert "sk-secret-123" not in str(caught.value)


def test_the_same_key_twice_is_refused() -> None:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    with pytest.raises(ValueError, match="entry 2 names a key an earlier entry names"):
        parse_key_overrides(f'{{"keys": {{"{KEY}": {{}}, "sha256:{digest}": {{}}}}}}')


def test_keys_file_is_checked_when_the_settings_are(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": {"sk-x": {"search_budget_per_day": "many"}}}')
    with pytest.raises(ValueError, match=r"entry 1\.search_budget_per_day"):
        ServeSettings(keys_file=path)
    with pytest.raises(ValueError, match="No such file"):
        ServeSettings(keys_file=tmp_path / "missing.json")
    path.write_text('{"keys": {"sk-x": {"search_budget_per_day": 3}}}')
    assert (
        load_key_overrides(ServeSettings(keys_file=path).keys_file)
        .get(hashlib.sha256(b"sk-x").digest())
        .budget_or(None)
        == 3
    )


def test_search_cache_url_is_an_alias_of_redis_url() -> None:
    assert ServeSettings(search_cache_url="redis://h:1/0").shared_redis_url == "redis://h:1/0"
    assert ServeSettings(redis_url="redis://h:1/0").shared_redis_url == "redis://h:1/0"
    assert ServeSettings(redis_url="redis://h:1/0", search_cache_url="redis://h:1/0").shared_redis_url
    with pytest.raises(ValueError, match="alias"):
        ServeSettings(redis_url="redis://h:1/0", search_cache_url="redis://other:1/0")


# ----- Redis health (pure) ---------------------------------------------------------------------


def test_link_health_rests_after_a_failure_then_tries_again() -> None:
    now = [0.0]
    health = LinkHealth(retry_after_s=5.0, clock=lambda: now[0])
    assert health.usable() and health.due_for_probe()
    assert health.failed() is True  # up -> down: the one transition to log
    assert not health.usable() and health.down_since == 0.0
    now[0] = 4.9
    assert not health.usable()
    assert health.failed() is False  # still down: nothing new to log
    now[0] = 10.0
    assert health.usable()  # rested long enough: the next call tries
    assert health.succeeded() is True and health.up and health.down_since is None
    assert not health.due_for_probe()  # it just answered
    now[0] = 15.0
    assert health.due_for_probe()


# ----- the Lua scripts against a real Redis ----------------------------------------------------


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it as root)")
    with RedisServer(tmp_path_factory.mktemp("redis")) as running:
        yield running


def metrics() -> HTTPMetrics:
    return HTTPMetrics(registry=CollectorRegistry())


def sample(m: HTTPMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_lua_bucket_answers_as_the_python_one(redis: RedisServer) -> None:
    limit = RateLimit.of(60, burst=3)
    times = [100.0, 100.0, 100.0, 100.0, 100.5, 101.2, 101.2, 104.0, 104.0, 103.0, 200.0]

    async def main() -> list[float]:
        state = SharedState.connect(redis.url)
        client = b"lua-parity" + bytes(22)
        waits = [await state.take_token(client, limit, now=t) for t in times]
        await state.aclose()
        return waits

    redis_waits = run(main())
    tokens: float | None = None
    updated = 0.0
    python_waits = []
    for now in times:
        tokens, wait = take(tokens, updated, now, limit)
        updated = now
        python_waits.append(wait)
    assert redis_waits == pytest.approx(python_waits, abs=1e-5)
    assert python_waits[:4] == [0.0, 0.0, 0.0, 1.0]  # the burst of 3, then a second to wait


def test_two_replicas_drain_one_bucket(redis: RedisServer) -> None:
    async def main() -> list[float]:
        a, b = SharedState.connect(redis.url), SharedState.connect(redis.url)
        limit = RateLimit.of(6)  # a burst of one
        client = b"two-replicas" + bytes(20)
        waits = [await (a if i % 2 else b).take_token(client, limit) for i in range(6)]
        waits.append(await a.take_token(b"someone-else" + bytes(20), limit))
        ttl = await a.client.ttl("ssrl:rate:v1:" + client.hex())
        await a.aclose()
        await b.aclose()
        return [*waits, ttl]

    *waits, other, ttl = run(main())
    assert waits[0] == 0.0
    assert all(w > 0 for w in waits[1:])  # the second replica found the bucket empty
    assert all(w <= 10.0 for w in waits[1:])  # a token every 10 s at 6 a minute
    assert other == 0.0  # another key has its own bucket
    assert 0 < ttl <= RateLimit.of(6).idle_ttl_s


def test_shared_budget_holds_across_replicas_and_refunds(redis: RedisServer) -> None:
    now = 1_700_000_000.0

    async def main() -> tuple[list[bool], dict[str, Any], dict[str, Any], int]:
        m = metrics()
        a = SearchBudget(2, shared=SharedState.connect(redis.url, m), metrics=m, clock=lambda: now)
        b = SearchBudget(2, shared=SharedState.connect(redis.url, m), metrics=m, clock=lambda: now)
        client = b"budget-key" + bytes(22)
        allowed = []
        first, spent = await a.take(client)
        allowed.append(first.allowed)
        assert spent is not None and spent.shared and spent.day == "2023-11-14"
        await b.refund(client, spent)  # a cache hit: given back, on whichever replica
        for budget in (b, a, b, a):
            verdict_, _ = await budget.take(client)
            allowed.append(verdict_.allowed)
        usage_a, usage_b = await a.usage(client), await b.usage(client)
        ttl = await a.shared.client.ttl(f"ssrl:budget:v1:{client.hex()}:2023-11-14")  # type: ignore[union-attr]
        counts = {r: sample(m, "ssrl_search_budget_total", result=r) for r in ("spent", "refunded", "denied")}
        assert counts == {"spent": 3.0, "refunded": 1.0, "denied": 2.0}
        for budget in (a, b):
            await budget.shared.aclose()  # type: ignore[union-attr]
        return allowed, usage_a, usage_b, ttl

    allowed, usage_a, usage_b, ttl = run(main())
    assert allowed == [True, True, True, False, False]
    assert usage_a == usage_b
    assert usage_a["used"] == 2 and usage_a["remaining"] == 0 and usage_a["limit"] == 2
    assert usage_a["shared"] is True and usage_a["resets_at"] == 1_700_006_400
    assert 0 < ttl <= 2 * DAY_S


# ----- Redis unreachable: fail open to the replica's own state ---------------------------------


def test_redis_down_falls_back_to_local_state_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[list[Any], dict[str, Any], dict[str, Any], HTTPMetrics]:
        m = metrics()
        shared = SharedState.connect(f"redis://127.0.0.1:{free_port()}/0", m, timeout_s=0.2)
        outcomes: list[Any] = []
        for _ in range(2):
            try:
                outcomes.append(await shared.take_token(DIGEST, RateLimit.of(6)))
            except SharedStateUnavailable:
                outcomes.append("local")
        budget = SearchBudget(1, shared=shared, metrics=m)
        first, spent = await budget.take(DIGEST)
        second, _ = await budget.take(DIGEST)
        outcomes += [first.allowed, spent is not None and spent.shared, second.allowed]
        health = await shared.probe()
        usage = await budget.usage(DIGEST)
        await shared.aclose()
        return outcomes, health, usage, m

    with caplog.at_level(logging.WARNING, logger="server.shared_state"):
        outcomes, health, usage, m = run(main())
    # Budget: this replica's own ledger holds the limit (1), and nothing was shared.
    assert outcomes == ["local", "local", True, False, False]
    assert health["redis"] == "down" and "per replica" in health["note"]
    assert usage["used"] == 1 and usage["shared"] is False
    assert sample(m, "ssrl_shared_state_up", store="redis") == 0.0
    assert sample(m, "ssrl_shared_state_errors_total", operation="rate_limit") == 1.0
    # After the failure Redis is left alone: the later checks did not wait on it.
    assert sample(m, "ssrl_shared_state_errors_total", operation="budget") == 0.0
    assert sample(m, "ssrl_shared_state_local_total", operation="rate_limit") == 2.0
    assert sample(m, "ssrl_shared_state_local_total", operation="budget") == 3.0
    lost = [r for r in caplog.records if "redis failed" in r.getMessage()]
    assert len(lost) == 1  # once per outage, not per request


def test_redis_back_is_shared_again(redis: RedisServer, tmp_path: Path) -> None:
    async def main() -> list[Any]:
        m = metrics()
        port = free_port()
        shared = SharedState(
            SharedState.connect(f"redis://127.0.0.1:{port}/0", timeout_s=0.2).client,
            m,
            LinkHealth(retry_after_s=0.0),
        )
        seen: list[Any] = [(await shared.probe())["redis"], sample(m, "ssrl_shared_state_up", store="redis")]
        backup = RedisServer(tmp_path, port=port).start()
        try:
            seen += [(await shared.probe())["redis"], sample(m, "ssrl_shared_state_up", store="redis")]
            seen.append(await shared.take_token(DIGEST, RateLimit.of(6)))
        finally:
            await shared.aclose()
            backup.stop()
        return seen

    assert run(main()) == ["down", 0.0, "up", 1.0, 0.0]


# ----- the loop asks the key's allowance -------------------------------------------------------


class Allowance:
    def __init__(self, grants: list[bool]) -> None:
        self.grants = grants
        self.refunds = 0

    async def take(self) -> bool:
        return self.grants.pop(0)

    async def refund(self) -> None:
        self.refunds += 1


class Backend:
    name = "paid"

    def __init__(self) -> None:
        self.queries: list[str] = []

    async def search(self, query: str, k: int) -> list[Document]:
        self.queries.append(query)
        return [Document("Paris", "Paris is the capital of France.", url="https://x/Paris")]

    async def aclose(self) -> None:
        return None


def native_turns(*queries: str) -> ScriptedEngine:
    def respond(call: Call) -> Script:
        if call.options.stop == ("</information>",):
            return script("filled by the model</information>")
        done = call.prompt_text.count("\n\n<information>")
        if done < len(queries):
            return script(f"<search> {queries[done]} </search>")
        return script("<answer> Paris </answer>")

    return ScriptedEngine(responder=respond)


def run_loop(engine: ScriptedEngine, allowance: Allowance, search: SearchService) -> Any:
    config = LoopConfig(mode="native", policy=AlwaysPolicy(), allowance=allowance)
    prompt = engine.tokenizer.encode("Q?")
    loop = SelfSearchLoop(engine, search, config, prompt, "req", vocab_size=engine.vocab_size)

    async def main() -> Any:
        return [e async for e in loop.run()][-1].result

    return run(main())


def test_past_the_budget_the_loop_self_fills_and_says_budget() -> None:
    backend = Backend()
    allowance = Allowance([True, False, False])
    result = run_loop(native_turns("one", "two", "three"), allowance, SearchService([backend]))
    assert backend.queries == ["one"]  # nothing sent once the budget said no
    assert [(r.route, r.fallback) for r in result.searches] == [
        ("external", None),
        ("external", BUDGET_FALLBACK),
        ("external", BUDGET_FALLBACK),
    ]
    assert [r.information for r in result.searches[1:]] == ["filled by the model"] * 2
    trace = result.trace()
    assert trace["external_calls"] == 1 and trace["fallbacks"] == 2
    assert trace["searches"][1]["fallback"] == "budget"
    assert trace["notes"].count(BUDGET_NOTE) == 1
    assert result.answer == "Paris" and allowance.refunds == 0
    m = metrics()
    m.record_trajectory(result.searches)
    assert sample(m, "ssrl_searches_total", decision="external", backend="none", outcome="budget") == 2.0


def test_a_cache_hit_gives_its_search_back() -> None:
    backend = Backend()
    allowance = Allowance([True, True])
    search = SearchService.from_backends([backend], cache=SearchCache())
    result = run_loop(native_turns("same query", "same query"), allowance, search)
    assert backend.queries == ["same query"]
    assert [r.cache_hit for r in result.searches] == [False, True]
    assert allowance.refunds == 1  # the hit cost no provider call


# ----- two in-process apps sharing one Redis ---------------------------------------------------


def app_for(
    engine: ScriptedEngine, monkeypatch: pytest.MonkeyPatch, backend: Backend, **settings: Any
) -> Any:
    monkeypatch.setattr(
        server.app,
        "build_search_service",
        lambda s, observer=None, redis_client=None: SearchService([backend], timeout_s=s.search_timeout),
    )
    values: dict[str, Any] = {
        "api_key": [KEY, OTHER],
        "warmup": False,
        "search": "none",
        "search_mode": "native",
        "search_policy": "always",
        **settings,
    }
    return create_app(ServeSettings(**values), engine_factory=lambda _: engine)


async def serving(apps: list[Any], body: Any) -> Any:
    """`body(clients)` with each app's lifespan running, one client per app."""
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30)
                )
            )
        return await body(clients)


def chat_body() -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "max_tokens": 256,
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_two_apps_share_a_rate_limit_and_a_search_budget(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    # OTHER: its own, looser rate and a search budget of one a day.
    keys.write_text(f'{{"keys": {{"{OTHER}": {{"rate_limit": 6000, "search_budget_per_day": 1}}}}}}')
    run(redis_flush(redis))
    backend = Backend()
    apps = [
        app_for(
            native_turns("capital of France"),
            monkeypatch,
            backend,
            redis_url=redis.url,
            # A burst of one, and a token back only every 1000 s: none comes back mid-test.
            rate_limit=0.06,
            keys_file=keys,
        )
        for _ in range(2)
    ]

    async def body(clients: list[httpx.AsyncClient]) -> dict[str, Any]:
        burst = [(await clients[i % 2].get("/v1/models", headers=bearer(KEY))).status_code for i in range(10)]
        first = await clients[0].post(CHAT, json=chat_body(), headers=bearer(OTHER))
        second = await clients[1].post(CHAT, json=chat_body(), headers=bearer(OTHER))
        searched = await clients[1].get("/v1/search", params={"q": "x"}, headers=bearer(OTHER))
        usage = await clients[0].get("/v1/search_budget", headers=bearer(OTHER))
        health = await clients[1].get("/health")
        return {
            "burst": burst,
            "first": first,
            "second": second,
            "searched": searched,
            "usage": usage,
            "health": health,
        }

    seen = run(serving(apps, body))
    # A burst of one across both apps, where each process alone would let one through.
    assert seen["burst"].count(200) == 1 and seen["burst"].count(429) == 9
    first = seen["first"].json()["choices"][0]["self_search"]["searches"][0]
    second = seen["second"].json()["choices"][0]
    assert (first["decision"], first["fallback"]) == ("external", None)
    assert (second["self_search"]["searches"][0]["fallback"]) == "budget"
    assert BUDGET_NOTE in second["self_search"]["notes"]
    assert second["message"]["content"] == "Paris"  # the request never fails for it
    assert backend.queries == ["capital of France"]
    assert seen["searched"].status_code == 429
    assert seen["searched"].json()["error"]["code"] == "search_budget_exceeded"
    assert 0 < int(seen["searched"].headers["Retry-After"]) <= DAY_S
    usage = seen["usage"].json()
    assert (usage["limit"], usage["used"], usage["remaining"], usage["shared"]) == (1, 1, 0, True)
    assert seen["health"].json() == {"status": "ok", "shared_state": {"redis": "up"}}


async def redis_flush(redis: RedisServer) -> None:
    state = SharedState.connect(redis.url)
    await state.client.flushdb()
    await state.aclose()


def test_apps_keep_answering_with_redis_gone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    apps = [
        app_for(native_turns(), monkeypatch, Backend(), redis_url=dead, rate_limit=6, search_budget_per_day=5)
        for _ in range(2)
    ]

    async def body(clients: list[httpx.AsyncClient]) -> list[Any]:
        statuses = [(await c.get("/v1/models", headers=bearer(KEY))).status_code for c in clients]
        statuses.append((await clients[0].get("/v1/models", headers=bearer(KEY))).status_code)
        health = (await clients[0].get("/health")).json()
        exposition = (await clients[0].get("/metrics")).text
        return [statuses, health, exposition]

    statuses, health, exposition = run(serving(apps, body))
    # Each app limits on its own (one each, then 429): serving, and still limiting.
    assert statuses == [200, 200, 429]
    assert health["status"] == "ok" and health["shared_state"]["redis"] == "down"
    assert 'ssrl_shared_state_up{store="redis"} 0.0' in exposition
    assert 'ssrl_shared_state_local_total{operation="rate_limit"}' in exposition
