"""Exa: neural web search that can return each page's text with the results.

``POST {base}/search`` with ``{"query", "numResults", "contents": {"text": true}}`` and the key
in ``x-api-key``; the answer's ``results[] {title, url, text, highlights, score}`` are the
documents (``highlights`` stand in when ``text`` is absent). Full page texts make large
answers, so this backend's default body cap is 8 MiB instead of 2 MiB.
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

DEFAULT_BASE_URL = "https://api.exa.ai"
ENV_KEY = "EXA_API_KEY"
MAX_RESULTS = 100
DEFAULT_SETTINGS = HttpSettings(max_body_bytes=8 * 1024 * 1024)


class ExaBackend(HttpBackend):
    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        settings: HttpSettings | None = None,
        name: str = "exa",
        search_type: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            base_url=base_url,
            settings=settings or DEFAULT_SETTINGS,
            headers={"x-api-key": api_key},
        )
        self.search_type = search_type

    @classmethod
    def from_options(cls, options: Mapping[str, str], secrets: Mapping[str, str]) -> ExaBackend:
        opts = Options("exa", options, COMMON_HTTP_OPTIONS | {"type"})
        return cls(
            require_secret(secrets, ENV_KEY, "exa"),
            base_url=opts.get("base_url") or DEFAULT_BASE_URL,
            settings=opts.http_settings(DEFAULT_SETTINGS),
            name=opts.get("name") or "exa",
            search_type=opts.get("type"),
        )

    async def search(self, query: str, k: int) -> list[Document]:
        query = cut_query(query)
        if not query or k <= 0:
            return []
        body: dict[str, Any] = {
            "query": query,
            "numResults": clamp(k, 1, MAX_RESULTS),
            "contents": {"text": True},
        }
        if self.search_type:
            body["type"] = self.search_type
        answer = await self.request_object("POST", "/search", json_body=body)
        if "results" not in answer:
            raise shape_error(self.name, "no 'results'")
        results = expect_list(answer["results"], self.name, "'results'")
        usable = [r for r in results if isinstance(r, dict) and opt_str(r, "url")]
        docs = []
        for rank, r in enumerate(usable):
            text = opt_str(r, "text")
            highlights = r.get("highlights")
            if not text.strip() and isinstance(highlights, list):
                text = "\n".join(h for h in highlights if isinstance(h, str))
            docs.append(
                self.document(
                    title=opt_str(r, "title") or opt_str(r, "url"),
                    text=text,
                    url=opt_str(r, "url"),
                    score=opt_float(r, "score"),
                    rank=rank,
                    doc_id=opt_str(r, "id") or None,
                )
            )
        require_items(results, docs, self.name)
        return docs[:k]
