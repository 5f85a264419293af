"""Tavily: a search API built for agents; it returns page extracts with relevance scores.

``POST {base}/search`` with ``{"query", "max_results"}`` and ``Authorization: Bearer <key>``;
the answer's ``results[] {title, url, content, score}`` are the documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.search.base import Document
from router.search.providers.config import COMMON_HTTP_OPTIONS, Options, require_secret
from router.search.providers.http import (
    HttpBackend,
    HttpSettings,
    clamp,
    cut_query,
    expect_list,
    opt_float,
    opt_str,
    require_items,
    shape_error,
)

DEFAULT_BASE_URL = "https://api.tavily.com"
ENV_KEY = "TAVILY_API_KEY"
MAX_RESULTS = 20  # the API refuses more


class TavilyBackend(HttpBackend):
    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        settings: HttpSettings | None = None,
        name: str = "tavily",
        search_depth: str | None = None,
        topic: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            base_url=base_url,
            settings=settings,
            headers={"Authorization": f"Bearer {api_key}"},
        )
        self.search_depth, self.topic = search_depth, topic

    @classmethod
    def from_options(cls, options: Mapping[str, str], secrets: Mapping[str, str]) -> TavilyBackend:
        opts = Options("tavily", options, COMMON_HTTP_OPTIONS | {"search_depth", "topic"})
        return cls(
            require_secret(secrets, ENV_KEY, "tavily"),
            base_url=opts.get("base_url") or DEFAULT_BASE_URL,
            settings=opts.http_settings(),
            name=opts.get("name") or "tavily",
            search_depth=opts.get("search_depth"),
            topic=opts.get("topic"),
        )

    async def search(self, query: str, k: int) -> list[Document]:
        query = cut_query(query)
        if not query or k <= 0:
            return []
        body: dict[str, Any] = {"query": query, "max_results": clamp(k, 1, MAX_RESULTS)}
        if self.search_depth:
            body["search_depth"] = self.search_depth
        if self.topic:
            body["topic"] = self.topic
        answer = await self.request_object("POST", "/search", json_body=body)
        if "results" not in answer:
            raise shape_error(self.name, "no 'results'")
        results = expect_list(answer["results"], self.name, "'results'")
        usable = [r for r in results if isinstance(r, dict) and opt_str(r, "url")]
        docs = [
            self.document(
                title=opt_str(r, "title") or opt_str(r, "url"),
                text=opt_str(r, "content"),
                url=opt_str(r, "url"),
                score=opt_float(r, "score"),
                rank=rank,
            )
            for rank, r in enumerate(usable)
        ]
        require_items(results, docs, self.name)
        return docs[:k]
