"""Resilience around one search backend: a concurrency bound, a rate limit, a circuit
breaker, and retries with backoff, all inside one deadline per search.

`ResilientBackend(inner, policy)` is itself a `SearchBackend` (same `name`), so it can be
chained, cached (`router.search.cache.CachedBackend`) and handed to `SearchService`.

Per search, in this order:

1. The deadline starts (`policy.deadline_s`, measured on the injected clock). Every wait
   below counts against it.
2. Per attempt (a request to the provider):
   a. the circuit breaker is asked first, so an open breaker fails fast
      (`CircuitOpenError`) without waiting for a slot or a token, and without touching the
      provider;
   b. a concurrency slot is taken (`max_concurrency` requests in flight at most);
   c. a rate-limit token is taken (`rate_per_s`, token bucket): when the wait for it
      would pass the deadline, the search gives up at once instead of waiting;
   d. the request runs, bounded by what is left of the deadline;
   e. the breaker records what the request said about the provider's health.
3. Retries (tenacity) run attempts again only after a `SearchTransportError` or a
   retryable `SearchHTTPError` (429, 5xx), at most `max_attempts` attempts in all, waiting
   a jittered exponential backoff, or the `Retry-After` the provider sent. A Retry-After
   over `max_retry_after_s` gives up instead of waiting, and so does a wait that would end
   past the deadline.

The breaker counts attempts, not searches: it measures the provider's health, and one
search that failed three times is three bad answers. Because it is asked before every
attempt, the retries of a search stop as soon as the breaker opens (another search's
failures may open it meanwhile).

Every answer is normalised as it arrives (`router.search.normalize.usable_documents`):
invalid text, markup and non-http(s) URLs never get past this layer, so never into a cache.

What counts as a breaker failure: transport errors (including an attempt cut by the
deadline), 429, 5xx, malformed answers (`SearchResponseError`; an answer none of whose
documents is usable is one), and anything unexpected a backend raises. Other 4xx (400,
401, 403, 404...) do not: the provider answered, so for the breaker they count as a
success (they reset the count and close a half-open breaker).
A 401/403 is a configuration error, not ill health: waiting `reset_after_s` never fixes
it, so opening the breaker would only cycle open/half-open/open forever and replace the
telling "HTTP 401" in the trace with "circuit open". It is already cheap (one quick
request, never retried, then the chain moves on). Deployments that prefer to stop sending
requests with a bad key can list such statuses in `policy.trip_statuses`.

Errors raised to the caller are all `SearchError` subclasses whose messages are built
from the backend's name, counts, and the messages of the `SearchError`s the backend raised
(key-free by contract). Anything else a backend raises is reported by its class name only:
arbitrary exception messages (an HTTP client's, say) may hold a URL with a key in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from tenacity import AsyncRetrying, RetryCallState
from tenacity.wait import wait_random_exponential

from router.search.base import (
    Document,
    SearchBackend,
    SearchError,
    SearchHTTPError,
    SearchResponseError,
    SearchTransportError,
)
from router.search.normalize import usable_documents

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Breaker states, as the observer hears them.
CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


# ----- errors ---------------------------------------------------------------------------


class CircuitOpenError(SearchError):
    """The backend's circuit breaker is open: the call failed fast, the provider untouched."""


class SearchTimeoutError(SearchError):
    """The search's deadline passed (or would have passed before the next retry)."""


# ----- policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResiliencePolicy:
    """How one backend is called. Times in seconds."""

    # Requests to the provider in flight at once (per backend).
    max_concurrency: int = 8
    # Requests per second (token bucket), None for no limit; `rate_burst` tokens at most.
    rate_per_s: float | None = None
    rate_burst: float = 1.0
    # Consecutive failed attempts that open the breaker (0 turns the breaker off), and how
    # long it stays open before one trial request is let through.
    failure_threshold: int = 5
    reset_after_s: float = 30.0
    # 4xx statuses that count as breaker failures besides 429 (say {401, 403}).
    trip_statuses: frozenset[int] = frozenset()
    # Attempts per search in all (1 = no retry), and the jittered exponential backoff
    # between them: a random wait in [0, min(backoff_max_s, backoff_base_s * 2**(n-1))].
    max_attempts: int = 3
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    # A provider's Retry-After is honoured up to this; longer, the search gives up.
    max_retry_after_s: float = 10.0
    # The whole search, waits included.
    deadline_s: float = 15.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive (or None for no limit)")
        if self.rate_burst < 1:
            raise ValueError("rate_burst must be at least 1")
        if self.failure_threshold < 0:
            raise ValueError("failure_threshold must be 0 (off) or more")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        if min(self.reset_after_s, self.backoff_base_s, self.backoff_max_s, self.max_retry_after_s) < 0:
            raise ValueError("durations must not be negative")


# ----- observer -----------------------------------------------------------------------------


class SearchObserver(Protocol):
    """What the resilience and cache layers report; the server maps it onto Prometheus.

    Callbacks are synchronous and must be quick. An observer that raises is logged and
    ignored: metrics never fail a search.
    """

    def on_attempt(self, backend: str, attempt: int) -> None:
        """A request is about to go to the provider (attempt 1, 2, ... of this search)."""

    def on_retry(self, backend: str, reason: str, wait_s: float) -> None:
        """An attempt failed and will be retried after `wait_s`.

        `reason` is one of: transport, rate_limited (429), server_error (5xx).
        """

    def on_result(self, backend: str, outcome: str, latency_s: float) -> None:
        """A search through the resilience layer ended: ok, error, circuit_open or timeout."""

    def on_breaker(self, backend: str, state: str) -> None:
        """The backend's breaker moved to `state`: closed, open or half_open."""

    def on_cache(self, backend: str, hit: bool) -> None:
        """A cache lookup for `backend` hit or missed."""


class NullObserver:
    """The default observer: does nothing."""

    def on_attempt(self, backend: str, attempt: int) -> None:
        pass

    def on_retry(self, backend: str, reason: str, wait_s: float) -> None:
        pass

    def on_result(self, backend: str, outcome: str, latency_s: float) -> None:
        pass

    def on_breaker(self, backend: str, state: str) -> None:
        pass

    def on_cache(self, backend: str, hit: bool) -> None:
        pass


def notify(observer: SearchObserver | None, event: str, *args: object) -> None:
    """Call `observer.<event>(*args)`, never letting it raise into the search."""
    if observer is None:
        return
    try:
        getattr(observer, event)(*args)
    except Exception:  # a metrics bug must never fail a search
        logger.exception("search observer %s failed", event)


# ----- per-call statistics -----------------------------------------------------------------


@dataclass
class CallStats:
    """What one search through the wrappers did, for the trace (filled in as it goes)."""

    # Requests that reached the provider.
    attempts: int = 0
    # Answered from the cache.
    cache_hit: bool = False


# ----- building blocks ------------------------------------------------------------------------


class Permit:
    """Leave to send one request, from `CircuitBreaker.acquire`; `trial` for the one
    request a half-open breaker lets through."""

    __slots__ = ("trial",)

    def __init__(self, trial: bool) -> None:
        self.trial = trial


class CircuitBreaker:
    """Consecutive-failure breaker: closed -> open -> half-open (one trial) -> closed/open.

    Single event loop only (no locking). `threshold` 0 turns it off (always closed).
    Any verdict counts, whichever request brings it: a success closes the breaker, a
    failure while half-open re-opens it.
    """

    def __init__(
        self,
        threshold: int,
        reset_after_s: float,
        clock: Clock = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._on_change = on_change
        self._state = CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._trial: Permit | None = None  # the half-open trial out now

    @property
    def state(self) -> str:
        """The state as of now (an open breaker past its period reads half_open)."""
        if self._state == OPEN and self._clock() - self._opened_at >= self.reset_after_s:
            return HALF_OPEN
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when not open)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_after_s - self._clock())

    def acquire(self) -> Permit | None:
        """Leave to send a request now, or None; takes the one trial of a half-open breaker."""
        if self.threshold <= 0 or self._state == CLOSED:
            return Permit(trial=False)
        if self._state == OPEN:
            if self._clock() - self._opened_at < self.reset_after_s:
                return None
            self._move(HALF_OPEN)
        if self._trial is not None:  # half-open, its trial already out
            return None
        self._trial = Permit(trial=True)
        return self._trial

    def record_success(self, permit: Permit) -> None:
        self.failures = 0
        self._end(permit)
        if self._state != CLOSED:
            self._move(CLOSED)

    def record_failure(self, permit: Permit) -> None:
        self._end(permit)
        if self.threshold <= 0:
            return
        self.failures += 1
        if self._state == HALF_OPEN or (self._state == CLOSED and self.failures >= self.threshold):
            self._opened_at = self._clock()
            self._move(OPEN)

    def release(self, permit: Permit) -> None:
        """The request ended with no verdict (cancelled, or never sent)."""
        self._end(permit)

    def _end(self, permit: Permit) -> None:
        if permit is self._trial:
            self._trial = None

    def _move(self, state: str) -> None:
        self._state = state
        if state != HALF_OPEN:
            self._trial = None
        if self._on_change is not None:
            self._on_change(state)


class TokenBucket:
    """`rate` tokens a second, `burst` at most; callers reserve a token and wait its time."""

    def __init__(self, rate: float, burst: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def reserve(self, max_wait: float) -> float | None:
        """Take a token: the seconds to wait before using it, or None (nothing taken) when
        that wait would exceed `max_wait`."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate
        if wait > max_wait:
            return None
        self._tokens -= 1
        return wait


# ----- the wrapper ---------------------------------------------------------------------------


class _Deadline(Exception):
    """Internal: the search's deadline passed while `what`."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass
class _Call:
    """State of one search through `ResilientBackend`."""

    started: float
    deadline: float
    stats: CallStats
    # Planned wait after each failed attempt, shared by tenacity's stop and wait hooks.
    waits: dict[int, float] = field(default_factory=dict)
    # Why retries stopped early, when they did: None, "deadline", "retry_after",
    # "circuit_open".
    stopped: str | None = None
    last_error: BaseException | None = None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _retry_reason(exc: BaseException | None) -> str:
    if isinstance(exc, SearchHTTPError):
        return "rate_limited" if exc.status == 429 else "server_error"
    return "transport"


class ResilientBackend:
    """A `SearchBackend` that calls `inner` under `policy` (see the module docstring)."""

    def __init__(
        self,
        inner: SearchBackend,
        policy: ResiliencePolicy | None = None,
        observer: SearchObserver | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.policy = policy or ResiliencePolicy()
        self.observer = observer
        self._clock = clock
        self._sleep = sleep
        self._slots = asyncio.Semaphore(self.policy.max_concurrency)
        self._bucket = (
            TokenBucket(self.policy.rate_per_s, self.policy.rate_burst, clock)
            if self.policy.rate_per_s
            else None
        )
        self.breaker = CircuitBreaker(
            self.policy.failure_threshold,
            self.policy.reset_after_s,
            clock,
            on_change=lambda state: notify(self.observer, "on_breaker", self.name, state),
        )
        self._backoff = wait_random_exponential(
            multiplier=self.policy.backoff_base_s, max=self.policy.backoff_max_s
        )

    # -- SearchBackend ------------------------------------------------------------------

    async def search(self, query: str, k: int) -> list[Document]:
        return await self.search_with_stats(query, k, None)

    async def aclose(self) -> None:
        await self.inner.aclose()

    # -- the call -----------------------------------------------------------------------

    async def search_with_stats(self, query: str, k: int, stats: CallStats | None = None) -> list[Document]:
        """`search`, filling `stats` (attempts made) as it goes."""
        now = self._clock()
        call = _Call(
            started=now,
            deadline=now + self.policy.deadline_s,
            stats=stats if stats is not None else CallStats(),
        )
        retrying = AsyncRetrying(  # one per call: tenacity keeps per-run state on the object
            retry=lambda rs: self._should_retry(rs, call),
            stop=lambda rs: self._should_stop(rs, call),
            wait=lambda rs: self._planned_wait(rs, call),
            before_sleep=lambda rs: self._before_sleep(rs, call),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            docs: list[Document] = await retrying(self._attempt, query, k, call)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancellation: no verdict, no report
                raise
            error, outcome = self._final_error(exc, call)
            notify(self.observer, "on_result", self.name, outcome, self._clock() - call.started)
            raise error from exc
        notify(self.observer, "on_result", self.name, "ok", self._clock() - call.started)
        return docs

    def _remaining(self, call: _Call) -> float:
        return call.deadline - self._clock()

    async def _attempt(self, query: str, k: int, call: _Call) -> list[Document]:
        permit = self.breaker.acquire()
        if permit is None:
            raise CircuitOpenError(self._open_message())
        verdict: bool | None = None  # True: healthy, False: unhealthy, None: no verdict
        try:
            remaining = self._remaining(call)
            if remaining <= 0:
                raise _Deadline("before the request")
            if self._slots.locked():
                try:
                    await asyncio.wait_for(self._slots.acquire(), remaining)
                except TimeoutError:
                    raise _Deadline("waiting for a concurrency slot") from None
            else:
                await self._slots.acquire()
            try:
                if self._bucket is not None:
                    wait = self._bucket.reserve(max_wait=self._remaining(call))
                    if wait is None:
                        raise _Deadline("waiting for the rate limit")
                    if wait > 0:
                        await self._sleep(wait)
                remaining = self._remaining(call)
                if remaining <= 0:
                    raise _Deadline("waiting for the rate limit")
                call.stats.attempts += 1
                notify(self.observer, "on_attempt", self.name, call.stats.attempts)
                try:
                    docs = await asyncio.wait_for(self.inner.search(query, k), remaining)
                    # Normalised here, where the provider's answer enters, so nothing above
                    # (the cache, the loop, the routes) ever holds a raw result; an answer
                    # with nothing usable is a malformed one (a breaker failure, no retry).
                    docs = usable_documents(self.name, docs)
                except TimeoutError:
                    verdict = False
                    raise _Deadline("waiting for the provider") from None
                except SearchError as exc:
                    verdict = not self._trips(exc)
                    call.last_error = exc
                    raise
                except Exception as exc:  # a backend bug: unhealthy, reported by class only
                    verdict = False
                    err = SearchError(f"unexpected {type(exc).__name__}")
                    call.last_error = err
                    raise err from exc
                verdict = True
                return list(docs)
            finally:
                self._slots.release()
        finally:
            if verdict is True:
                self.breaker.record_success(permit)
            elif verdict is False:
                self.breaker.record_failure(permit)
            else:
                self.breaker.release(permit)

    def _trips(self, exc: SearchError) -> bool:
        """Does this error say the provider is unhealthy (a breaker failure)?"""
        if isinstance(exc, SearchHTTPError):
            return exc.retryable or exc.status in self.policy.trip_statuses
        return True  # transport, malformed answers, other SearchErrors

    # -- tenacity hooks ---------------------------------------------------------------------

    def _should_retry(self, rs: RetryCallState, call: _Call) -> bool:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        if isinstance(exc, SearchHTTPError):
            if not exc.retryable:
                return False
            if exc.retry_after is not None and exc.retry_after > self.policy.max_retry_after_s:
                call.stopped = "retry_after"
                return False
            return True
        return isinstance(exc, SearchTransportError)

    def _planned_wait(self, rs: RetryCallState, call: _Call) -> float:
        n = rs.attempt_number
        if n not in call.waits:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            if isinstance(exc, SearchHTTPError) and exc.retry_after is not None:
                call.waits[n] = max(0.0, exc.retry_after)
            else:
                call.waits[n] = float(self._backoff(rs))
        return call.waits[n]

    def _should_stop(self, rs: RetryCallState, call: _Call) -> bool:
        if rs.attempt_number >= self.policy.max_attempts:
            return True
        wait = self._planned_wait(rs, call)
        if wait >= self._remaining(call):
            call.stopped = "deadline"
            return True
        if self.breaker.state == OPEN and self.breaker.retry_in() > wait:
            call.stopped = "circuit_open"  # opened meanwhile: the retry would fail fast
            return True
        return False

    def _before_sleep(self, rs: RetryCallState, call: _Call) -> None:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        wait = self._planned_wait(rs, call)
        notify(self.observer, "on_retry", self.name, _retry_reason(exc), wait)
        logger.info(
            "search backend %s: attempt %d failed (%s), retrying in %.2fs",
            self.name,
            rs.attempt_number,
            type(exc).__name__,
            wait,
        )

    # -- errors ---------------------------------------------------------------------------

    def _open_message(self) -> str:
        return (
            f"{self.name}: circuit open after {_plural(self.breaker.failures, 'failure')}, "
            f"next trial in {self.breaker.retry_in():.1f}s"
        )

    def _detail(self, exc: BaseException | None) -> str:
        """The message of an error the backend raised, without a leading `name: `."""
        text = str(exc) if exc is not None else ""
        prefix = f"{self.name}: "
        while text.startswith(prefix):
            text = text[len(prefix) :]
        return text or (type(exc).__name__ if exc is not None else "no error")

    def _final_error(self, exc: Exception, call: _Call) -> tuple[SearchError, str]:
        """The error the caller sees, and the outcome reported to the observer."""
        n = _plural(call.stats.attempts, "attempt")
        last = call.last_error
        if isinstance(exc, CircuitOpenError) or call.stopped == "circuit_open":
            if call.stats.attempts == 0:
                return CircuitOpenError(str(exc)), "circuit_open"
            msg = f"{self.name}: {n} failed, then the circuit opened: {self._detail(last)}"
            return CircuitOpenError(msg), "circuit_open"
        if isinstance(exc, _Deadline):
            msg = f"{self.name}: deadline of {self.policy.deadline_s:g}s passed {exc.what}"
            if call.stats.attempts:
                msg += f" after {n}"
                if last is not None:
                    msg += f": {self._detail(last)}"
            return SearchTimeoutError(msg), "timeout"
        if call.stopped == "deadline":
            msg = (
                f"{self.name}: gave up after {n}, the next retry would pass the "
                f"{self.policy.deadline_s:g}s deadline: {self._detail(exc)}"
            )
            return SearchTimeoutError(msg), "timeout"
        msg = f"{self.name}: {n} failed: {self._detail(exc)}"
        if call.stopped == "retry_after" and isinstance(exc, SearchHTTPError):
            msg += f" (Retry-After {exc.retry_after:g}s is over the {self.policy.max_retry_after_s:g}s cap)"
        return _same_kind(exc, msg), "error"


def _same_kind(exc: Exception, message: str) -> SearchError:
    """A new error of `exc`'s kind (status and Retry-After kept) with `message`."""
    if isinstance(exc, SearchHTTPError):
        return SearchHTTPError(message, exc.status, exc.retry_after)
    for kind in (SearchTransportError, SearchResponseError):
        if isinstance(exc, kind):
            return kind(message)
    return SearchError(message)
