"""Brave Search: an independent web index.

``GET {base}/res/v1/web/search?q=&count=`` with the key in ``X-Subscription-Token``; the
answer's ``web.results[] {title, url, description, extra_snippets}`` are the documents.
Descriptions carry ``<strong>`` highlighting, stripped here. ``q`` is limited to 400
characters and ``count`` to 20 by the API (a 422 otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from router.search.base import Document
from router.search.providers.config import COMMON_HTTP_OPTIONS, Options, require_secret
from router.search.providers.http import (
    HttpBackend,
    HttpSettings,
    clamp,
    cut_query,
    expect_dict,
    expect_list,
    opt_str,
    parse_retry_after,
    require_items,
    shape_error,
    strip_html,
)

DEFAULT_BASE_URL = "https://api.search.brave.com"
ENV_KEY = "BRAVE_API_KEY"
MAX_QUERY_CHARS = 400
MAX_COUNT = 20


def _rate_limit_reset(headers: httpx.Headers) -> float | None:
    """Seconds until the exhausted Brave window resets, from ``X-RateLimit-*``.

    Brave sends one comma-separated value per window (per second, per month):
    ``X-RateLimit-Remaining: 0, 9000`` and ``X-RateLimit-Reset: 1, 1419704``. The wait is the
    reset of the window that is at zero, else the shortest one.
    """
    try:
        resets = [float(v) for v in headers.get("x-ratelimit-reset", "").split(",") if v.strip()]
        remaining = [float(v) for v in headers.get("x-ratelimit-remaining", "").split(",") if v.strip()]
    except ValueError:
        return None
    if not resets:
        return None
    exhausted = [r for r, left in zip(resets, remaining, strict=False) if left <= 0]
    wait = max(exhausted) if exhausted else min(resets)
    return wait if wait >= 0 else None


class BraveBackend(HttpBackend):
    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        settings: HttpSettings | None = None,
        name: str = "brave",
        country: str | None = None,
        search_lang: str | None = None,
        safesearch: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            base_url=base_url,
            settings=settings,
            headers={"X-Subscription-Token": api_key},
        )
        self.extra_params = {
            key: value
            for key, value in (
                ("country", country),
                ("search_lang", search_lang),
                ("safesearch", safesearch),
            )
            if value
        }

    @classmethod
    def from_options(cls, options: Mapping[str, str], secrets: Mapping[str, str]) -> BraveBackend:
        opts = Options(
            "brave",
            options,
            COMMON_HTTP_OPTIONS | {"country", "search_lang", "safesearch"},
        )
        return cls(
            require_secret(secrets, ENV_KEY, "brave"),
            base_url=opts.get("base_url") or DEFAULT_BASE_URL,
            settings=opts.http_settings(),
            name=opts.get("name") or "brave",
            country=opts.get("country"),
            search_lang=opts.get("search_lang"),
            safesearch=opts.get("safesearch"),
        )

    def retry_after(self, headers: httpx.Headers) -> float | None:
        # Brave documents X-RateLimit-Reset rather than Retry-After; honour either.
        seconds = parse_retry_after(headers.get("retry-after"))
        return seconds if seconds is not None else _rate_limit_reset(headers)

    async def search(self, query: str, k: int) -> list[Document]:
        query = cut_query(query, MAX_QUERY_CHARS)
        if not query or k <= 0:
            return []
        params: dict[str, str | int] = {
            "q": query,
            "count": clamp(k, 1, MAX_COUNT),
            **self.extra_params,
        }
        answer = await self.request_object("GET", "/res/v1/web/search", params=params)
        if "web" not in answer:
            # Brave leaves out `web` when nothing matched; a real answer still echoes `query`.
            if "query" in answer:
                return []
            raise shape_error(self.name, "no 'web' results")
        web = expect_dict(answer["web"], self.name, "'web'")
        results = expect_list(web.get("results", []), self.name, "'web.results'")
        usable = [r for r in results if isinstance(r, dict) and opt_str(r, "url")]
        docs = []
        for rank, r in enumerate(usable):
            extra = r.get("extra_snippets")
            snippets = [opt_str(r, "description")]
            if isinstance(extra, list):
                snippets += [s for s in extra if isinstance(s, str)]
            docs.append(
                self.document(
                    title=strip_html(opt_str(r, "title")) or opt_str(r, "url"),
                    text="\n".join(strip_html(s) for s in snippets if s.strip()),
                    url=opt_str(r, "url"),
                    score=None,
                    rank=rank,
                )
            )
        require_items(results, docs, self.name)
        return docs[:k]
