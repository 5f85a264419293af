"""A search cache shared by router replicas, in Redis.

Same keys and rules as the in-memory `SearchCache` (backend, normalised query, k; only
successful results; a TTL), so replicas behind one Service answer a query any of them has
already paid for. Redis is an optimisation: when it is down or slow, a lookup is a miss and
a store is skipped, logged once per outage, and the search goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from router.search.base import Document
from router.search.cache import normalise_query

logger = logging.getLogger(__name__)

KEY_PREFIX = "ssrl:search:v1:"


class RedisSearchCache:
    """`aget` / `aput` over `redis.asyncio`; `url` like redis://host:6379/0."""

    def __init__(
        self,
        url: str,
        ttl_s: float = 600.0,
        cache_empty: bool = False,
        timeout_s: float = 0.5,
        client: Any = None,
    ) -> None:
        import redis.asyncio as redis

        self.ttl_s = ttl_s
        self.cache_empty = cache_empty
        self.enabled = ttl_s > 0
        self._client = client or redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self._healthy = True

    @staticmethod
    def key(backend: str, query: str, k: int) -> str:
        raw = json.dumps([backend, normalise_query(query), k], ensure_ascii=False)
        return KEY_PREFIX + hashlib.sha256(raw.encode()).hexdigest()

    def _failed(self, action: str, exc: Exception) -> None:
        self.errors += 1
        if self._healthy:
            logger.warning(
                "search cache: redis %s failed (%s); going on without it", action, type(exc).__name__
            )
        self._healthy = False

    async def aget(self, backend: str, query: str, k: int) -> list[Document] | None:
        try:
            raw = await self._client.get(self.key(backend, query, k))
        except Exception as exc:  # any Redis trouble is a miss, never a failed search
            self._failed("get", exc)
            self.misses += 1
            return None
        self._healthy = True
        if raw is None:
            self.misses += 1
            return None
        try:
            docs = [Document(**d) for d in json.loads(raw)]
        except (ValueError, TypeError) as exc:
            self._failed("decode", exc)
            self.misses += 1
            return None
        self.hits += 1
        return docs

    async def aput(self, backend: str, query: str, k: int, documents: Sequence[Document]) -> None:
        if not documents and not self.cache_empty:
            return
        payload = json.dumps([asdict(d) for d in documents], ensure_ascii=False)
        try:
            await self._client.set(self.key(backend, query, k), payload, ex=max(1, int(self.ttl_s)))
        except Exception as exc:
            self._failed("set", exc)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "errors": self.errors}

    async def aclose(self) -> None:
        await self._client.aclose()
