"""Calling search for the loop: a chain of backends, a deadline, and failures as values.

The loop never sees an exception from search: a failed or timed-out call comes back as
an outcome with `error` set, and the loop falls back to letting the model fill the
information itself, saying so in the trace.

`SearchService(backends, timeout_s)` calls the backends as given. The server builds it
with `SearchService.from_backends(backends, policy, cache, observer)`, which wraps each
backend in a `ResilientBackend` (concurrency bound, rate limit, circuit breaker, retries,
deadline) and, given a cache, a `CachedBackend` outside that. The chain is the same either
way: the backends are tried in order until one answers; a failure of any kind (an open
circuit included) moves on to the next. Either way, too, every document is normalised as a
backend's answer arrives (`router.search.normalize`: by `ResilientBackend`, or here for a
bare backend), before any cache stores it; an answer with nothing usable is a failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from router.search.base import Document, SearchBackend
from router.search.cache import CachedBackend, ResultCache
from router.search.normalize import usable_documents
from router.search.resilience import (
    CallStats,
    ResiliencePolicy,
    ResilientBackend,
    SearchObserver,
)

logger = logging.getLogger(__name__)

# How much longer than the resilience deadline the service's own hard limit is, so that
# the resilience layer always ends a search itself (and reports it) first.
_DEADLINE_MARGIN_S = 1.0


@dataclass(frozen=True)
class SearchOutcome:
    documents: list[Document] = field(default_factory=list)
    # The backend that answered (or the last one tried).
    backend: str = ""
    latency_s: float = 0.0
    # Why the search failed, or None when a backend answered: the `errors` joined by "; ".
    error: str | None = None
    # Requests that reached a provider, over every backend tried (0 for a cache hit).
    attempts: int = 0
    # The answer came from the cache.
    cache_hit: bool = False
    # One entry per backend that failed, in the order tried ("name: why"). A search that
    # fell back and then succeeded keeps the failures of the backends before it here.
    errors: list[str] = field(default_factory=list)


class SearchService:
    """Tries each backend in order until one answers within its deadline."""

    def __init__(self, backends: Sequence[SearchBackend], timeout_s: float = 10.0) -> None:
        self.backends = list(backends)
        self.timeout_s = timeout_s

    @classmethod
    def from_backends(
        cls,
        backends: Sequence[SearchBackend],
        policy: ResiliencePolicy | None = None,
        cache: ResultCache | None = None,
        observer: SearchObserver | None = None,
        *,
        policies: Mapping[str, ResiliencePolicy] | None = None,
        timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> SearchService:
        """A service whose backends are each wrapped: cache (when given) around resilience.

        `policy` applies to every backend (default `ResiliencePolicy()`), `policies`
        overrides it by backend name. `cache` None means no caching; one cache may serve
        every backend (its keys hold the backend's name). `timeout_s`, the service's own
        hard limit per backend, defaults to the longest policy deadline plus a margin, so
        it only catches what the resilience layer somehow did not. `clock` and `sleep` go
        to the resilience layer (tests pass fakes).
        """
        default = policy or ResiliencePolicy()
        chosen = [(b, (policies or {}).get(b.name, default)) for b in backends]
        wrapped: list[SearchBackend] = []
        for backend, backend_policy in chosen:
            layer: SearchBackend = ResilientBackend(backend, backend_policy, observer, clock, sleep)
            if cache is not None and cache.enabled:
                layer = CachedBackend(layer, cache, observer)
            wrapped.append(layer)
        if timeout_s is None:
            longest = max((p.deadline_s for _, p in chosen), default=default.deadline_s)
            timeout_s = longest + _DEADLINE_MARGIN_S
        return cls(wrapped, timeout_s)

    @property
    def name(self) -> str:
        return ",".join(b.name for b in self.backends) or "none"

    async def search(self, query: str, k: int) -> SearchOutcome:
        started = time.perf_counter()
        errors: list[str] = []
        attempts = 0
        last = "none"
        for backend in self.backends:
            last = backend.name
            stats = CallStats()
            try:
                docs = await asyncio.wait_for(self._call(backend, query, k, stats), self.timeout_s)
            except TimeoutError:
                errors.append(f"{backend.name}: timed out after {self.timeout_s:g}s")
            except Exception as exc:
                errors.append(_describe(backend.name, exc))
                logger.warning("search backend %s failed: %s", backend.name, type(exc).__name__)
            else:
                return SearchOutcome(
                    documents=list(docs)[:k],
                    backend=backend.name,
                    latency_s=time.perf_counter() - started,
                    attempts=attempts + stats.attempts,
                    cache_hit=stats.cache_hit,
                    errors=errors,
                )
            # Counted even when the call failed or timed out: stats fill in as it goes.
            attempts += stats.attempts
        if not self.backends:
            errors.append("no search backend is configured")
        return SearchOutcome(
            documents=[],
            backend=last,
            latency_s=time.perf_counter() - started,
            error="; ".join(errors),
            attempts=attempts,
            errors=errors,
        )

    @staticmethod
    async def _call(backend: SearchBackend, query: str, k: int, stats: CallStats) -> list[Document]:
        with_stats = getattr(backend, "search_with_stats", None)
        if with_stats is not None:
            return list(await with_stats(query, k, stats))
        stats.attempts += 1  # a plain backend: one request per call
        # Without the wrappers, this is where the backend's answer enters: normalise it here.
        return usable_documents(backend.name, await backend.search(query, k))

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()


def _describe(name: str, exc: BaseException) -> str:
    """`name: why`. The wrappers' messages already start with the backend's name."""
    message = str(exc)
    if message.startswith(f"{name}: "):
        return message
    return f"{name}: {type(exc).__name__}: {message}"
