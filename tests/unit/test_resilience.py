"""ResilientBackend (retries, Retry-After, deadline, breaker, concurrency, rate limit) and
the resilient SearchService chain, on scripted fakes with a fake clock: nothing really waits."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest

from router.search.base import (
    Document,
    SearchError,
    SearchHTTPError,
    SearchResponseError,
    SearchTransportError,
)
from router.search.cache import SearchCache
from router.search.resilience import (
    CallStats,
    CircuitBreaker,
    CircuitOpenError,
    NullObserver,
    ResiliencePolicy,
    ResilientBackend,
    SearchObserver,
    SearchTimeoutError,
)
from router.search.service import SearchService

SECRET = "sk-SECRET-123"
DOCS = [Document(title="Paris", text="Paris is the capital of France.", source="fake")]


class FakeTime:
    """A clock that only moves when `sleep` is awaited (or a test moves it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Scripted:
    """Answers each call with the next item of `script` (an exception is raised), then
    with `default`; counts calls. `advance` moves the fake clock on every call."""

    def __init__(
        self,
        name: str = "serper",
        script: Sequence[object] = (),
        default: object = None,
        time: FakeTime | None = None,
        advance: float = 0.0,
    ) -> None:
        self.name = name
        self.api_key = SECRET  # what a real provider backend would hold
        self.script = list(script)
        self.default = list(DOCS) if default is None else default
        self.time = time
        self.advance = advance
        self.calls = 0
        self.closed = False

    async def search(self, query: str, k: int) -> list[Document]:
        self.calls += 1
        if self.time is not None:
            self.time.now += self.advance
        item = self.script.pop(0) if self.script else self.default
        if isinstance(item, BaseException):
            raise item
        return list(item)  # type: ignore[call-overload]

    async def aclose(self) -> None:
        self.closed = True


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def on_attempt(self, backend: str, attempt: int) -> None:
        self.events.append(("attempt", backend, attempt))

    def on_retry(self, backend: str, reason: str, wait_s: float) -> None:
        self.events.append(("retry", backend, reason, wait_s))

    def on_result(self, backend: str, outcome: str, latency_s: float) -> None:
        self.events.append(("result", backend, outcome, latency_s))

    def on_breaker(self, backend: str, state: str) -> None:
        self.events.append(("breaker", backend, state))

    def on_cache(self, backend: str, hit: bool) -> None:
        self.events.append(("cache", backend, hit))

    def of(self, kind: str) -> list[tuple[object, ...]]:
        return [e for e in self.events if e[0] == kind]


def http(status: int, retry_after: float | None = None) -> SearchHTTPError:
    return SearchHTTPError(f"HTTP {status}", status, retry_after)


def wrap(
    inner: Scripted,
    t: FakeTime,
    observer: SearchObserver | None = None,
    **policy: object,
) -> ResilientBackend:
    return ResilientBackend(inner, ResiliencePolicy(**policy), observer, t.clock, t.sleep)  # type: ignore[arg-type]


def run_search(backend: ResilientBackend, query: str = "capital of France", k: int = 3):
    async def go():
        stats = CallStats()
        try:
            return await backend.search_with_stats(query, k, stats), stats
        except SearchError as exc:
            return exc, stats

    return asyncio.run(go())


# ----- retries ---------------------------------------------------------------------------


def test_transport_errors_are_retried_with_jittered_exponential_backoff() -> None:
    t = FakeTime()
    inner = Scripted(script=[SearchTransportError("connection reset")] * 2, time=t)
    result, stats = run_search(wrap(inner, t, backoff_base_s=0.2, backoff_max_s=5.0))
    assert result == DOCS
    assert inner.calls == stats.attempts == 3
    assert len(t.sleeps) == 2
    assert 0 <= t.sleeps[0] <= 0.2 and 0 <= t.sleeps[1] <= 0.4


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_429_and_5xx_are_retried(status: int) -> None:
    t = FakeTime()
    inner = Scripted(script=[http(status)])
    result, stats = run_search(wrap(inner, t))
    assert result == DOCS
    assert inner.calls == stats.attempts == 2


@pytest.mark.parametrize(
    "error", [http(400), http(401), http(403), http(404), SearchResponseError("no 'organic' list")]
)
def test_client_errors_and_malformed_answers_are_not_retried(error: SearchError) -> None:
    t = FakeTime()
    inner = Scripted(script=[error])
    result, stats = run_search(wrap(inner, t))
    assert inner.calls == stats.attempts == 1
    assert t.sleeps == []
    assert type(result) is type(error)
    assert str(result) == f"serper: 1 attempt failed: {error}"
    if isinstance(error, SearchHTTPError):
        assert result.status == error.status


def test_attempts_are_bounded_and_the_error_says_how_many() -> None:
    t = FakeTime()
    inner = Scripted(default=http(503))
    result, stats = run_search(wrap(inner, t, max_attempts=3, failure_threshold=0))
    assert inner.calls == stats.attempts == 3
    assert len(t.sleeps) == 2
    assert isinstance(result, SearchHTTPError) and result.status == 503
    assert str(result) == "serper: 3 attempts failed: HTTP 503"


def test_max_attempts_one_means_no_retry() -> None:
    t = FakeTime()
    inner = Scripted(default=SearchTransportError("connection refused"))
    result, _ = run_search(wrap(inner, t, max_attempts=1))
    assert inner.calls == 1
    assert isinstance(result, SearchTransportError)
    assert str(result) == "serper: 1 attempt failed: connection refused"


def test_retry_after_is_honoured_instead_of_the_backoff() -> None:
    t = FakeTime()
    inner = Scripted(script=[http(429, retry_after=2.5)])
    result, _ = run_search(wrap(inner, t, max_retry_after_s=10.0))
    assert result == DOCS
    assert t.sleeps == [2.5]
    assert inner.calls == 2


def test_a_retry_after_over_the_cap_gives_up_without_waiting() -> None:
    t = FakeTime()
    inner = Scripted(script=[http(429, retry_after=60.0)])
    result, _ = run_search(wrap(inner, t, max_retry_after_s=10.0))
    assert inner.calls == 1
    assert t.sleeps == []
    assert isinstance(result, SearchHTTPError) and result.status == 429
    assert result.retry_after == 60.0
    assert str(result) == "serper: 1 attempt failed: HTTP 429 (Retry-After 60s is over the 10s cap)"


def test_a_retry_after_past_the_deadline_gives_up_without_waiting() -> None:
    t = FakeTime()
    inner = Scripted(script=[http(503, retry_after=5.0)])
    result, _ = run_search(wrap(inner, t, deadline_s=3.0))
    assert inner.calls == 1
    assert t.sleeps == []
    assert isinstance(result, SearchTimeoutError)
    assert "deadline" in str(result) and "HTTP 503" in str(result)


def test_the_deadline_stops_retries() -> None:
    t = FakeTime()
    # Every call takes 0.6 s (on the fake clock) and fails: the second ends past the 1 s deadline.
    inner = Scripted(default=SearchTransportError("read timed out"), time=t, advance=0.6)
    result, stats = run_search(wrap(inner, t, deadline_s=1.0, max_attempts=10, backoff_base_s=0.1))
    assert inner.calls == stats.attempts == 2
    assert isinstance(result, SearchTimeoutError)
    assert str(result).startswith("serper: gave up after 2 attempts")
    assert str(result).endswith("read timed out")


def test_the_deadline_cuts_a_hanging_provider() -> None:
    cancelled = asyncio.Event()

    class Hanging(Scripted):
        async def search(self, query: str, k: int) -> list[Document]:
            self.calls += 1
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return []

    t = FakeTime()
    inner = Hanging()
    recorder = Recorder()
    result, _ = run_search(wrap(inner, t, recorder, deadline_s=0.02, max_attempts=3))
    assert isinstance(result, SearchTimeoutError)
    assert str(result) == "serper: deadline of 0.02s passed waiting for the provider after 1 attempt"
    assert inner.calls == 1
    assert cancelled.is_set()
    assert recorder.of("result")[0][2] == "timeout"


def test_unexpected_exceptions_are_search_errors_named_by_class_only() -> None:
    t = FakeTime()
    leak = RuntimeError(f"GET https://api.example.com/search?key={SECRET} failed")
    inner = Scripted(script=[leak])
    result, _ = run_search(wrap(inner, t))
    assert inner.calls == 1  # not retried
    assert type(result) is SearchError
    assert str(result) == "serper: 1 attempt failed: unexpected RuntimeError"
    assert SECRET not in str(result)


# ----- circuit breaker -------------------------------------------------------------------


def test_the_breaker_opens_after_consecutive_failures_and_fails_fast() -> None:
    t = FakeTime()
    recorder = Recorder()
    inner = Scripted(default=http(503))
    backend = wrap(inner, t, recorder, failure_threshold=3, max_attempts=1, reset_after_s=30)
    for _ in range(3):
        assert isinstance(run_search(backend)[0], SearchHTTPError)
    assert backend.breaker.state == "open"
    result, stats = run_search(backend)
    assert isinstance(result, CircuitOpenError)
    assert str(result) == "serper: circuit open after 3 failures, next trial in 30.0s"
    assert inner.calls == 3  # the provider was not touched
    assert stats.attempts == 0
    assert recorder.of("breaker") == [("breaker", "serper", "open")]
    assert recorder.of("result")[-1][2] == "circuit_open"


def test_a_success_resets_the_count() -> None:
    t = FakeTime()
    inner = Scripted(script=[http(503), http(503), DOCS, http(503), http(503)])
    backend = wrap(inner, t, failure_threshold=3, max_attempts=1)
    for _ in range(5):
        run_search(backend)
    assert backend.breaker.state == "closed"


def test_after_the_period_one_trial_goes_through_and_success_closes() -> None:
    t = FakeTime()
    recorder = Recorder()
    inner = Scripted(script=[http(503)] * 2)
    backend = wrap(inner, t, recorder, failure_threshold=2, max_attempts=1, reset_after_s=30)
    run_search(backend), run_search(backend)
    t.now += 29.9
    assert isinstance(run_search(backend)[0], CircuitOpenError)
    t.now += 0.1
    assert backend.breaker.state == "half_open"
    assert run_search(backend)[0] == DOCS
    assert backend.breaker.state == "closed"
    assert run_search(backend)[0] == DOCS
    assert inner.calls == 4
    assert [e[2] for e in recorder.of("breaker")] == ["open", "half_open", "closed"]


def test_a_failed_trial_reopens_the_breaker() -> None:
    t = FakeTime()
    recorder = Recorder()
    inner = Scripted(default=http(502))
    backend = wrap(inner, t, recorder, failure_threshold=2, max_attempts=3, reset_after_s=10)
    run_search(backend)  # two attempts fail, the breaker opens, the third never goes out
    assert inner.calls == 2
    t.now += 10
    result, stats = run_search(backend)
    assert stats.attempts == 1  # the trial; its retry is refused by the re-opened breaker
    assert isinstance(result, CircuitOpenError)
    assert inner.calls == 3
    assert backend.breaker.state == "open"
    assert isinstance(run_search(backend)[0], CircuitOpenError)
    assert inner.calls == 3
    assert [e[2] for e in recorder.of("breaker")] == ["open", "half_open", "open"]


def test_half_open_lets_exactly_one_trial_through() -> None:
    t = FakeTime()
    gate = asyncio.Event()

    class Gated(Scripted):
        async def search(self, query: str, k: int) -> list[Document]:
            self.calls += 1
            if self.calls <= 2:
                raise http(503)
            await gate.wait()
            return list(DOCS)

    inner = Gated()
    backend = wrap(inner, t, failure_threshold=2, max_attempts=1, reset_after_s=5, deadline_s=2.0)

    async def go():
        for _ in range(2):
            with pytest.raises(SearchHTTPError):
                await backend.search("q", 1)
        t.now += 5
        trial = asyncio.create_task(backend.search("q", 1))
        await asyncio.sleep(0)
        with pytest.raises(CircuitOpenError):
            await backend.search("q", 1)  # while the trial is out
        gate.set()
        assert await trial == DOCS
        assert await backend.search("q", 1) == DOCS

    asyncio.run(go())
    assert inner.calls == 4


def test_a_cancelled_trial_frees_the_half_open_slot() -> None:
    t = FakeTime()

    class Slow(Scripted):
        async def search(self, query: str, k: int) -> list[Document]:
            self.calls += 1
            if self.calls == 1:
                raise http(503)
            if self.calls == 2:
                await asyncio.sleep(30)
            return list(DOCS)

    inner = Slow()
    backend = wrap(inner, t, failure_threshold=1, max_attempts=1, reset_after_s=5)

    async def go():
        with pytest.raises(SearchHTTPError):
            await backend.search("q", 1)
        t.now += 5
        trial = asyncio.create_task(backend.search("q", 1))
        await asyncio.sleep(0)
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        assert await backend.search("q", 1) == DOCS

    asyncio.run(go())
    assert backend.breaker.state == "closed"


def test_only_the_trial_itself_frees_the_half_open_slot() -> None:
    t = FakeTime()
    breaker = CircuitBreaker(threshold=1, reset_after_s=5, clock=t.clock)
    early = breaker.acquire()  # let through while closed, still out
    assert early is not None and not early.trial
    breaker.record_failure(breaker.acquire())  # another request fails: open
    assert breaker.state == "open" and breaker.acquire() is None
    t.now += 5
    trial = breaker.acquire()
    assert trial is not None and trial.trial
    breaker.release(early)  # the early request is cancelled: the trial is still out
    assert breaker.acquire() is None
    breaker.record_success(trial)
    assert breaker.state == "closed"


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_do_not_trip_the_breaker(status: int) -> None:
    t = FakeTime()
    inner = Scripted(default=http(status))
    backend = wrap(inner, t, failure_threshold=2)
    for _ in range(5):
        assert isinstance(run_search(backend)[0], SearchHTTPError)
    assert inner.calls == 5
    assert backend.breaker.state == "closed"


def test_trip_statuses_make_a_401_count() -> None:
    t = FakeTime()
    inner = Scripted(default=http(401))
    backend = wrap(inner, t, failure_threshold=2, trip_statuses=frozenset({401}))
    for _ in range(4):
        run_search(backend)
    assert inner.calls == 2
    assert backend.breaker.state == "open"


@pytest.mark.parametrize(
    "error", [SearchTransportError("connection refused"), http(429), SearchResponseError("bad json")]
)
def test_unhealthy_errors_trip_the_breaker(error: SearchError) -> None:
    t = FakeTime()
    inner = Scripted(default=error)
    backend = wrap(inner, t, failure_threshold=2, max_attempts=1)
    for _ in range(4):
        run_search(backend)
    assert inner.calls == 2


def test_a_zero_threshold_turns_the_breaker_off() -> None:
    t = FakeTime()
    inner = Scripted(default=http(503))
    backend = wrap(inner, t, failure_threshold=0, max_attempts=1)
    for _ in range(10):
        run_search(backend)
    assert inner.calls == 10


# ----- concurrency and rate limit --------------------------------------------------------


def test_at_most_max_concurrency_requests_are_in_flight() -> None:
    t = FakeTime()
    gate = asyncio.Event()
    in_flight = peak = 0

    class Gated(Scripted):
        async def search(self, query: str, k: int) -> list[Document]:
            nonlocal in_flight, peak
            self.calls += 1
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await gate.wait()
            finally:
                in_flight -= 1
            return list(DOCS)

    inner = Gated()
    backend = wrap(inner, t, max_concurrency=2)

    async def go():
        tasks = [asyncio.create_task(backend.search(f"q{i}", 1)) for i in range(6)]
        for _ in range(10):
            await asyncio.sleep(0)
        assert in_flight == 2
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    assert results == [DOCS] * 6
    assert peak == 2
    assert inner.calls == 6


def test_the_rate_limit_makes_calls_wait_for_a_token() -> None:
    t = FakeTime()
    inner = Scripted()
    backend = wrap(inner, t, rate_per_s=2.0, rate_burst=1)
    for _ in range(3):
        assert run_search(backend)[0] == DOCS
    assert t.sleeps == [0.5, 0.5]
    assert inner.calls == 3


def test_a_rate_limit_wait_past_the_deadline_gives_up() -> None:
    t = FakeTime()
    inner = Scripted()
    recorder = Recorder()
    backend = wrap(inner, t, recorder, rate_per_s=0.1, deadline_s=5.0)
    assert run_search(backend)[0] == DOCS
    result, stats = run_search(backend)  # the next token is 10 s away
    assert isinstance(result, SearchTimeoutError)
    assert str(result) == "serper: deadline of 5s passed waiting for the rate limit"
    assert stats.attempts == 0
    assert inner.calls == 1
    assert t.sleeps == []
    assert recorder.of("result")[-1][2] == "timeout"


# ----- observer, naming, messages ----------------------------------------------------------


def test_the_observer_hears_attempts_retries_and_results() -> None:
    t = FakeTime()
    recorder = Recorder()
    inner = Scripted(script=[http(503, retry_after=1.0), SearchTransportError("reset"), http(429, 0.5)])
    backend = wrap(inner, t, recorder, max_attempts=4)
    assert run_search(backend)[0] == DOCS
    assert recorder.events == [
        ("attempt", "serper", 1),
        ("retry", "serper", "server_error", 1.0),
        ("attempt", "serper", 2),
        ("retry", "serper", "transport", t.sleeps[1]),
        ("attempt", "serper", 3),
        ("retry", "serper", "rate_limited", 0.5),
        ("attempt", "serper", 4),
        ("result", "serper", "ok", pytest.approx(sum(t.sleeps))),
    ]


def test_an_error_result_is_reported_once() -> None:
    t = FakeTime()
    recorder = Recorder()
    run_search(wrap(Scripted(default=http(500)), t, recorder, max_attempts=2, failure_threshold=0))
    assert [e[2] for e in recorder.of("result")] == ["error"]
    assert len(recorder.of("attempt")) == 2


def test_a_broken_observer_never_fails_a_search() -> None:
    class Broken(NullObserver):
        def on_attempt(self, backend: str, attempt: int) -> None:
            raise ValueError("metrics bug")

        def on_result(self, backend: str, outcome: str, latency_s: float) -> None:
            raise ValueError("metrics bug")

    t = FakeTime()
    assert run_search(wrap(Scripted(), t, Broken()))[0] == DOCS


def test_the_wrapper_keeps_the_name_and_closes_the_inner_backend() -> None:
    t = FakeTime()
    inner = Scripted(name="brave")
    backend = wrap(inner, t)
    assert backend.name == "brave"
    assert asyncio.run(backend.search("q", 1)) == DOCS
    asyncio.run(backend.aclose())
    assert inner.closed


def test_no_error_message_holds_the_key() -> None:
    t = FakeTime()
    cases = [
        Scripted(default=http(503)),
        Scripted(default=http(401)),
        Scripted(default=http(429, retry_after=99)),
        Scripted(default=SearchTransportError("connection refused")),
        Scripted(default=SearchResponseError("answer is not JSON")),
        Scripted(default=RuntimeError(f"https://x/?api_key={SECRET}")),
    ]
    for inner in cases:
        backend = wrap(inner, t, failure_threshold=1)
        for _ in range(2):  # the second is refused by the open breaker (where it trips)
            result, _ = run_search(backend)
            assert isinstance(result, SearchError)
            assert SECRET not in str(result) and SECRET not in repr(result)
            assert str(result).startswith("serper: ")


def test_policy_defaults_and_validation() -> None:
    policy = ResiliencePolicy()
    assert (policy.max_concurrency, policy.rate_per_s, policy.failure_threshold) == (8, None, 5)
    assert (policy.reset_after_s, policy.max_attempts, policy.backoff_base_s) == (30.0, 3, 0.2)
    assert (policy.backoff_max_s, policy.max_retry_after_s, policy.deadline_s) == (5.0, 10.0, 15.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 5  # type: ignore[misc]
    for bad in ({"max_attempts": 0}, {"max_concurrency": 0}, {"rate_per_s": 0}, {"deadline_s": 0}):
        with pytest.raises(ValueError):
            ResiliencePolicy(**bad)  # type: ignore[arg-type]


# ----- the resilient chain -------------------------------------------------------------------


def service(
    backends: list[Scripted],
    t: FakeTime,
    observer: SearchObserver | None = None,
    cache: SearchCache | None = None,
    **policy: object,
) -> SearchService:
    return SearchService.from_backends(
        backends,
        ResiliencePolicy(**policy),
        cache,
        observer,
        clock=t.clock,
        sleep=t.sleep,  # type: ignore[arg-type]
    )


def test_the_chain_falls_back_to_the_next_backend_and_reports_the_failure() -> None:
    t = FakeTime()
    one, two = Scripted("one", default=http(503)), Scripted("two")
    outcome = asyncio.run(service([one, two], t).search("q", 2))
    assert outcome.error is None
    assert outcome.backend == "two"
    assert outcome.documents == DOCS
    assert outcome.errors == ["one: 3 attempts failed: HTTP 503"]
    assert outcome.attempts == 4
    assert outcome.cache_hit is False


def test_when_every_backend_fails_the_error_says_why_for_each() -> None:
    t = FakeTime()
    one = Scripted("one", default=http(401))
    two = Scripted("two", default=SearchTransportError("connection refused"))
    outcome = asyncio.run(service([one, two], t).search("q", 2))
    assert outcome.documents == []
    assert outcome.backend == "two"
    assert outcome.errors == [
        "one: 1 attempt failed: HTTP 401",
        "two: 3 attempts failed: connection refused",
    ]
    assert outcome.error == "; ".join(outcome.errors)
    assert outcome.attempts == 4


def test_an_open_circuit_moves_on_to_the_next_backend() -> None:
    t = FakeTime()
    recorder = Recorder()
    one, two = Scripted("one", default=http(500)), Scripted("two")
    svc = service([one, two], t, recorder, failure_threshold=2, max_attempts=1)
    for _ in range(2):
        asyncio.run(svc.search("q", 2))
    outcome = asyncio.run(svc.search("q", 2))
    assert one.calls == 2
    assert outcome.backend == "two" and outcome.error is None
    assert outcome.errors[0].startswith("one: circuit open after 2 failures")
    assert outcome.attempts == 1
    assert ("result", "one", "circuit_open") in [e[:3] for e in recorder.events]


def test_the_chain_answers_from_the_cache_even_with_the_breaker_open() -> None:
    t = FakeTime()
    recorder = Recorder()
    cache = SearchCache(clock=t.clock)
    one = Scripted("one", script=[DOCS], default=http(503))
    svc = service([one], t, recorder, cache, failure_threshold=1, max_attempts=1)
    first = asyncio.run(svc.search("Capital of France?", 3))
    assert first.cache_hit is False and first.attempts == 1
    asyncio.run(svc.search("another query", 3))  # fails, opens the breaker
    hit = asyncio.run(svc.search("  capital of   france ", 3))
    assert hit.error is None and hit.cache_hit is True and hit.attempts == 0
    assert hit.documents == DOCS
    assert one.calls == 2
    assert [e[2] for e in recorder.of("cache")] == [False, False, True]


def test_from_backends_keeps_names_closes_and_sets_a_hard_limit_past_the_deadline() -> None:
    t = FakeTime()
    a, b = Scripted("a"), Scripted("b")
    svc = service([a, b], t, deadline_s=4.0)
    assert svc.name == "a,b"
    assert svc.timeout_s > 4.0
    asyncio.run(svc.aclose())
    assert a.closed and b.closed


def test_per_backend_policies_override_the_default() -> None:
    t = FakeTime()
    one, two = Scripted("one", default=http(503)), Scripted("two", default=http(503))
    svc = SearchService.from_backends(
        [one, two],
        ResiliencePolicy(max_attempts=3),
        policies={"two": ResiliencePolicy(max_attempts=1)},
        clock=t.clock,
        sleep=t.sleep,
    )
    outcome = asyncio.run(svc.search("q", 1))
    assert (one.calls, two.calls) == (3, 1)
    assert outcome.attempts == 4
