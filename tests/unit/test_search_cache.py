"""SearchCache and CachedBackend: normalised keys, TTL (fake clock), size bound, off switch,
only successes cached, hit/miss counts and observer reports."""

from __future__ import annotations

import asyncio

import pytest

from router.search.base import Document, SearchHTTPError, SearchTransportError
from router.search.cache import CachedBackend, SearchCache, normalise_query
from router.search.resilience import CallStats, NullObserver

DOCS = [Document(title="Paris", text="Paris is the capital of France.", source="fake")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Counting:
    """Answers with the next scripted item (exceptions raised), then `DOCS`; counts calls."""

    def __init__(self, name: str = "serper", script: list[object] | None = None) -> None:
        self.name = name
        self.script = list(script or [])
        self.queries: list[tuple[str, int]] = []
        self.closed = False

    async def search(self, query: str, k: int) -> list[Document]:
        self.queries.append((query, k))
        item = self.script.pop(0) if self.script else DOCS
        if isinstance(item, BaseException):
            raise item
        return list(item)  # type: ignore[call-overload]

    async def aclose(self) -> None:
        self.closed = True


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.cache: list[tuple[str, bool]] = []

    def on_cache(self, backend: str, hit: bool) -> None:
        self.cache.append((backend, hit))


def search(backend: CachedBackend, query: str, k: int = 3) -> tuple[list[Document], CallStats]:
    stats = CallStats()
    docs = asyncio.run(backend.search_with_stats(query, k, stats))
    return docs, stats


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("  Paris? ", "paris"),
        ("paris", "paris"),
        ("What is  the\tcapital\nof France?!", "what is the capital of france"),
        ("«Who wrote 'Hamlet'?»", "who wrote 'hamlet"),
        ("¿Dónde está Madrid?", "dónde está madrid"),
        ("C++ compilers", "c++ compilers"),
        ("...", ""),
    ],
)
def test_queries_are_normalised(raw: str, key: str) -> None:
    assert normalise_query(raw) == key


def test_a_normalised_query_hits_and_the_provider_gets_the_query_as_written() -> None:
    inner, recorder = Counting(), Recorder()
    cache = SearchCache()
    backend = CachedBackend(inner, cache, recorder)
    first, s1 = search(backend, "  Paris? ")
    second, s2 = search(backend, "paris")
    assert first == second == DOCS
    assert inner.queries == [("  Paris? ", 3)]
    assert (s1.cache_hit, s1.attempts) == (False, 1)
    assert (s2.cache_hit, s2.attempts) == (True, 0)
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.stats() == {"hits": 1, "misses": 1, "size": 1}
    assert recorder.cache == [("serper", False), ("serper", True)]


def test_k_and_the_backend_are_part_of_the_key() -> None:
    cache = SearchCache()
    cache.put("serper", "paris", 3, DOCS)
    assert cache.get("serper", "Paris", 3) == DOCS
    assert cache.get("serper", "paris", 5) is None
    assert cache.get("brave", "paris", 3) is None


def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    inner = Counting()
    backend = CachedBackend(inner, SearchCache(ttl_s=600, clock=clock))
    search(backend, "paris")
    clock.now += 599
    assert search(backend, "paris")[1].cache_hit
    clock.now += 1
    assert not search(backend, "paris")[1].cache_hit
    assert len(inner.queries) == 2


def test_the_size_is_bounded_and_the_least_recently_used_goes() -> None:
    cache = SearchCache(maxsize=2)
    cache.put("b", "one", 1, DOCS)
    cache.put("b", "two", 1, DOCS)
    assert cache.get("b", "one", 1) == DOCS  # "two" is now the least recently used
    cache.put("b", "three", 1, DOCS)
    assert len(cache) == 2
    assert cache.get("b", "two", 1) is None
    assert cache.get("b", "one", 1) == DOCS and cache.get("b", "three", 1) == DOCS


@pytest.mark.parametrize("cache", [SearchCache(enabled=False), SearchCache(maxsize=0), SearchCache(ttl_s=0)])
def test_a_disabled_cache_always_asks_the_provider(cache: SearchCache) -> None:
    inner, recorder = Counting(), Recorder()
    backend = CachedBackend(inner, cache, recorder)
    for _ in range(3):
        docs, stats = search(backend, "paris")
        assert docs == DOCS and not stats.cache_hit
    assert len(inner.queries) == 3
    assert not cache.enabled
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
    assert recorder.cache == []


def test_failures_are_not_cached() -> None:
    inner = Counting(script=[SearchHTTPError("HTTP 503", 503), SearchTransportError("reset")])
    cache = SearchCache()
    backend = CachedBackend(inner, cache)
    for error in (SearchHTTPError, SearchTransportError):
        with pytest.raises(error):
            search(backend, "paris")
    assert len(cache) == 0
    assert search(backend, "paris")[0] == DOCS
    assert search(backend, "paris")[1].cache_hit
    assert len(inner.queries) == 3


def test_empty_results_are_not_cached_unless_asked() -> None:
    inner = Counting(script=[[], []])
    backend = CachedBackend(inner, SearchCache())
    assert search(backend, "nothing")[0] == []
    assert search(backend, "nothing")[0] == []
    assert len(inner.queries) == 2
    keep = CachedBackend(Counting(script=[[]]), SearchCache(cache_empty=True))
    assert search(keep, "nothing")[0] == []
    assert search(keep, "nothing") == ([], CallStats(attempts=0, cache_hit=True))


def test_callers_cannot_change_what_is_cached() -> None:
    backend = CachedBackend(Counting(), SearchCache())
    first, _ = search(backend, "paris")
    first.clear()
    assert search(backend, "paris")[0] == DOCS


def test_the_wrapper_keeps_the_name_and_closes_the_inner_backend() -> None:
    inner = Counting(name="brave")
    backend = CachedBackend(inner, SearchCache())
    assert backend.name == "brave"
    assert asyncio.run(backend.search("q", 1)) == DOCS
    asyncio.run(backend.aclose())
    assert inner.closed


def test_clear_empties_the_cache() -> None:
    cache = SearchCache()
    cache.put("b", "q", 1, DOCS)
    cache.clear()
    assert len(cache) == 0 and cache.get("b", "q", 1) is None
