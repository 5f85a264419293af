"""The search cache shared between replicas, against a real redis-server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from router.search.base import Document
from router.search.cache import CachedBackend
from router.search.redis_cache import RedisSearchCache
from tests.redis_server import RedisServer, free_port, needs_redis

pytestmark = needs_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis:
        yield redis.url


class CountingBackend:
    def __init__(self, name: str = "serper") -> None:
        self.name = name
        self.calls = 0

    async def search(self, query: str, k: int) -> list[Document]:
        self.calls += 1
        return [
            Document(
                title="Paris",
                text="Capital of France.",
                url="https://x/Paris",
                score=1.5,
                source=self.name,
                id="d1",
            )
        ][:k]

    async def aclose(self) -> None:
        return None


def test_two_replicas_share_results(redis_url):
    async def main() -> None:
        first, second = CountingBackend(), CountingBackend()
        replica_a = CachedBackend(first, RedisSearchCache(redis_url, ttl_s=60))
        replica_b = CachedBackend(second, RedisSearchCache(redis_url, ttl_s=60))
        docs = await replica_a.search("Capital of France?", 3)
        again = await replica_b.search("  capital of france ", 3)
        assert first.calls == 1 and second.calls == 0  # replica B answered from Redis
        assert again == docs and again[0].url == "https://x/Paris" and again[0].score == 1.5
        assert replica_b.cache.stats()["hits"] == 1
        await replica_a.cache.aclose()
        await replica_b.cache.aclose()

    asyncio.run(main())


def test_entries_expire(redis_url):
    async def main() -> None:
        cache = RedisSearchCache(redis_url, ttl_s=1)
        backend = CountingBackend("expiring")
        cached = CachedBackend(backend, cache)
        await cached.search("ttl query", 1)
        assert await cache.aget("expiring", "ttl query", 1) is not None
        await asyncio.sleep(2.1)
        assert await cache.aget("expiring", "ttl query", 1) is None
        await cache.aclose()

    asyncio.run(main())


def test_redis_down_is_a_miss_not_a_failure():
    async def main() -> None:
        cache = RedisSearchCache(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, timeout_s=0.2)
        backend = CountingBackend()
        cached = CachedBackend(backend, cache)
        assert (await cached.search("q", 1))[0].title == "Paris"
        assert (await cached.search("q", 1))[0].title == "Paris"
        assert backend.calls == 2 and cache.stats()["errors"] >= 2
        await cache.aclose()

    asyncio.run(main())
