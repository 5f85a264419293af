"""SearXNG: a self-hosted metasearch engine, so there is no default address and no key.

``GET {base}/search?q=&format=json`` (plus ``engines``, ``categories``, ``language``...); the
answer's ``results[] {url, title, content, engine, score}`` are the documents. SearXNG has no
result-count parameter: one page comes back and is cut to k. JSON output is off in a stock
``settings.yml``; the instance then answers 403, reported with the setting to change.
"""

from __future__ import annotations

from collections.abc import Mapping

from router.search.base import Document
from router.search.providers.config import COMMON_HTTP_OPTIONS, Options
from router.search.providers.http import (
    HttpBackend,
    HttpSettings,
    cut_query,
    expect_list,
    opt_float,
    opt_str,
    require_items,
    shape_error,
    strip_html,
)

_PARAM_OPTIONS = ("engines", "categories", "language", "safesearch", "time_range")


class SearxngBackend(HttpBackend):
    def __init__(
        self,
        *,
        base_url: str,
        settings: HttpSettings | None = None,
        name: str = "searxng",
        engines: list[str] | None = None,
        categories: list[str] | None = None,
        language: str | None = None,
        safesearch: str | None = None,
        time_range: str | None = None,
    ) -> None:
        super().__init__(name=name, base_url=base_url, settings=settings)
        params = {
            "engines": ",".join(engines or []),
            "categories": ",".join(categories or []),
            "language": language or "",
            "safesearch": safesearch or "",
            "time_range": time_range or "",
        }
        self.extra_params = {key: value for key, value in params.items() if value}

    @classmethod
    def from_options(cls, options: Mapping[str, str], secrets: Mapping[str, str]) -> SearxngBackend:
        opts = Options("searxng", options, COMMON_HTTP_OPTIONS | set(_PARAM_OPTIONS))
        return cls(
            base_url=opts.require("base_url"),
            settings=opts.http_settings(),
            name=opts.get("name") or "searxng",
            engines=opts.get_list("engines"),
            categories=opts.get_list("categories"),
            language=opts.get("language"),
            safesearch=opts.get("safesearch"),
            time_range=opts.get("time_range"),
        )

    def status_hint(self, status: int) -> str | None:
        if status == 403:
            return (
                "JSON output is disabled on this instance: add 'json' to search.formats in its settings.yml"
            )
        if status == 429:
            return "rate limited by the instance's limiter (exempt this client in limiter.toml)"
        return super().status_hint(status)

    async def search(self, query: str, k: int) -> list[Document]:
        query = cut_query(query)
        if not query or k <= 0:
            return []
        params = {"q": query, "format": "json", **self.extra_params}
        answer = await self.request_object("GET", "/search", params=params)
        if "results" not in answer:
            raise shape_error(self.name, "no 'results'")
        results = expect_list(answer["results"], self.name, "'results'")
        usable = [r for r in results if isinstance(r, dict) and opt_str(r, "url")]
        docs = [
            self.document(
                title=strip_html(opt_str(r, "title")) or opt_str(r, "url"),
                text=strip_html(opt_str(r, "content")),
                url=opt_str(r, "url"),
                score=opt_float(r, "score"),
                rank=rank,
            )
            for rank, r in enumerate(usable)
        ]
        require_items(results, docs, self.name)
        return docs[:k]
