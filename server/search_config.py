"""The search backend chain, assembled from settings: providers, keys, resilience, cache."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from router.search.base import SearchBackend
from router.search.cache import ResultCache, SearchCache
from router.search.providers import create_backend, load_secrets
from router.search.resilience import ResiliencePolicy, SearchObserver
from router.search.service import SearchService
from server.settings import ServeSettings


def backend_names(settings: ServeSettings) -> list[str]:
    return [n.strip() for n in settings.search.split(",") if n.strip() and n.strip() != "none"]


def backend_options(settings: ServeSettings) -> dict[str, dict[str, str]]:
    """`--search-option NAME.KEY=VALUE` pairs grouped by backend, plus the named shortcuts."""
    options: dict[str, dict[str, str]] = defaultdict(dict)
    if settings.searxng_url:
        options["searxng"]["base_url"] = settings.searxng_url
    for item in settings.search_option:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not name.strip() or not key.strip():
            raise ValueError(f"--search-option expects BACKEND.KEY=VALUE, got {item.split('=')[0]!r}")
        options[name.strip()][key.strip()] = value
    return options


def resilience_policy(settings: ServeSettings) -> ResiliencePolicy:
    return ResiliencePolicy(
        max_concurrency=settings.search_concurrency,
        rate_per_s=settings.search_rate_limit,
        failure_threshold=settings.search_breaker_failures,
        reset_after_s=settings.search_breaker_reset,
        max_attempts=settings.search_max_attempts,
        deadline_s=settings.search_timeout,
    )


def build_backends(settings: ServeSettings) -> list[SearchBackend]:
    options = backend_options(settings)
    secrets = load_secrets(os.environ, settings.secrets_file)
    backends = []
    for name in backend_names(settings):
        opts = dict(options.get(name, {}))
        if name == "local" and "index_dir" not in opts:
            from router.search.default_corpus import ensure_default_index

            opts["index_dir"] = str(settings.index_dir or ensure_default_index(settings.cache_dir))
        backends.append(create_backend(name, opts, secrets))
    return backends


def build_search_service(
    settings: ServeSettings, observer: SearchObserver | None = None, redis_client: Any = None
) -> SearchService:
    """Each backend wrapped in retries, a breaker and limits; one shared result cache.

    With --redis-url the cache is in Redis, over `redis_client` when given (the connection
    the rate limits and budgets use); --search-cache-size 0 turns it off there too."""
    cache: ResultCache | None = None
    url = settings.shared_redis_url
    if url and settings.search_cache_size > 0:
        from router.search.redis_cache import RedisSearchCache

        cache = RedisSearchCache(url, ttl_s=settings.search_cache_ttl, client=redis_client)
    elif settings.search_cache_size > 0:
        cache = SearchCache(maxsize=settings.search_cache_size, ttl_s=settings.search_cache_ttl)
    return SearchService.from_backends(build_backends(settings), resilience_policy(settings), cache, observer)
