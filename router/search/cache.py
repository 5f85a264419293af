"""A TTL cache of search results, and the backend wrapper that uses it.

`SearchCache` holds successful results keyed by (backend name, normalised query, k): the
query is lower-cased, its whitespace folded to single spaces, and whitespace and
punctuation stripped from both ends, so "  Paris? " and "paris" share an entry. The
provider is always sent the query as written; only the key is normalised.

`CachedBackend(inner, cache, observer)` is a `SearchBackend` wrapper (chosen over
building the cache into `SearchService` so that it composes like the resilience layer and
can be tested on its own). It goes outside `ResilientBackend`: a hit costs no concurrency
slot and no rate-limit token, and is served even while the provider's breaker is open.

Only successes are cached; failures never are, and neither are empty results by default
(an empty answer is as often a provider glitch as a real "nothing found", and caching it
would pin the glitch for the whole TTL). The cache is off with `maxsize=0`, `ttl_s=0` or
`enabled=False`. One event loop only: `cachetools` caches are not thread-safe.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Protocol

from cachetools import TTLCache

from router.search.base import Document, SearchBackend
from router.search.resilience import CallStats, SearchObserver, notify

CacheKey = tuple[str, str, int]


def _is_edge_junk(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def normalise_query(query: str) -> str:
    """Lower case, whitespace folded, whitespace and punctuation stripped at both ends."""
    text = " ".join(query.lower().split())
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[start:end]


class ResultCache(Protocol):
    """What `CachedBackend` needs of a cache: in memory (`SearchCache`) or shared (Redis)."""

    enabled: bool

    async def aget(self, backend: str, query: str, k: int) -> list[Document] | None: ...

    async def aput(self, backend: str, query: str, k: int, documents: Sequence[Document]) -> None: ...


class SearchCache:
    """Successful search results for `ttl_s` seconds, `maxsize` entries at most (LRU)."""

    def __init__(
        self,
        maxsize: int = 1024,
        ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool = True,
        cache_empty: bool = False,
    ) -> None:
        if maxsize < 0 or ttl_s < 0:
            raise ValueError("maxsize and ttl_s must not be negative")
        self.maxsize = maxsize
        self.ttl_s = ttl_s
        self.enabled = enabled and maxsize > 0 and ttl_s > 0
        self.cache_empty = cache_empty
        self._entries: TTLCache[CacheKey, tuple[Document, ...]] | None = (
            TTLCache(maxsize=maxsize, ttl=ttl_s, timer=clock) if self.enabled else None
        )
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(backend: str, query: str, k: int) -> CacheKey:
        return (backend, normalise_query(query), k)

    def get(self, backend: str, query: str, k: int) -> list[Document] | None:
        """The cached documents, or None on a miss (counted; a disabled cache counts nothing)."""
        if self._entries is None:
            return None
        docs = self._entries.get(self.key(backend, query, k))
        if docs is None:
            self.misses += 1
            return None
        self.hits += 1
        return list(docs)

    def put(self, backend: str, query: str, k: int, documents: Sequence[Document]) -> None:
        """Remember a successful result (empty ones only when `cache_empty`)."""
        if self._entries is None or (not documents and not self.cache_empty):
            return
        self._entries[self.key(backend, query, k)] = tuple(documents)

    # The async face every cache offers (a shared cache such as Redis needs I/O).
    async def aget(self, backend: str, query: str, k: int) -> list[Document] | None:
        return self.get(backend, query, k)

    async def aput(self, backend: str, query: str, k: int, documents: Sequence[Document]) -> None:
        self.put(backend, query, k, documents)

    def clear(self) -> None:
        if self._entries is not None:
            self._entries.clear()

    def __len__(self) -> int:
        if self._entries is None:
            return 0
        self._entries.expire()
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self)}


class CachedBackend:
    """A `SearchBackend` that answers from `cache` when it can, and fills it on success."""

    def __init__(
        self,
        inner: SearchBackend,
        cache: ResultCache,
        observer: SearchObserver | None = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.cache = cache
        self.observer = observer

    async def search(self, query: str, k: int) -> list[Document]:
        return await self.search_with_stats(query, k, None)

    async def search_with_stats(self, query: str, k: int, stats: CallStats | None = None) -> list[Document]:
        stats = stats if stats is not None else CallStats()
        if self.cache.enabled:
            cached = await self.cache.aget(self.name, query, k)
            notify(self.observer, "on_cache", self.name, cached is not None)
            if cached is not None:
                stats.cache_hit = True
                return cached
        inner_call = getattr(self.inner, "search_with_stats", None)
        if inner_call is not None:
            docs = list(await inner_call(query, k, stats))
        else:
            docs = list(await self.inner.search(query, k))
            stats.attempts += 1
        await self.cache.aput(self.name, query, k, docs)
        return docs

    async def aclose(self) -> None:
        await self.inner.aclose()
