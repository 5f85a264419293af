"""Serper (SSRL's own engine): Google results as JSON.

``POST {base}/search`` with ``{"q", "num"}`` and the key in ``X-API-KEY``. The answer's
``organic[] {title, link, snippet, position}`` are the documents; when Google showed an answer
box or a knowledge-graph panel, that comes first, since it is usually the direct answer.
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
    opt_str,
    require_items,
    shape_error,
)

DEFAULT_BASE_URL = "https://google.serper.dev"
ENV_KEY = "SERPER_API_KEY"
# Serper bills two credits above 10 results and accepts up to 100.
MAX_NUM = 100


class SerperBackend(HttpBackend):
    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        settings: HttpSettings | None = None,
        name: str = "serper",
        gl: str | None = None,
        hl: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            base_url=base_url,
            settings=settings,
            headers={"X-API-KEY": api_key},
        )
        self.gl, self.hl = gl, hl

    @classmethod
    def from_options(cls, options: Mapping[str, str], secrets: Mapping[str, str]) -> SerperBackend:
        opts = Options("serper", options, COMMON_HTTP_OPTIONS | {"gl", "hl"})
        return cls(
            require_secret(secrets, ENV_KEY, "serper"),
            base_url=opts.get("base_url") or DEFAULT_BASE_URL,
            settings=opts.http_settings(),
            name=opts.get("name") or "serper",
            gl=opts.get("gl"),
            hl=opts.get("hl"),
        )

    async def search(self, query: str, k: int) -> list[Document]:
        query = cut_query(query)
        if not query or k <= 0:
            return []
        body: dict[str, Any] = {"q": query, "num": clamp(k, 1, MAX_NUM)}
        if self.gl:
            body["gl"] = self.gl
        if self.hl:
            body["hl"] = self.hl
        answer = await self.request_object("POST", "/search", json_body=body)
        if "organic" not in answer and "searchParameters" not in answer:
            raise shape_error(self.name, "no 'organic' results")
        organic = expect_list(answer.get("organic", []), self.name, "'organic'")

        featured = self._featured(answer, query)
        offset = 0 if featured is None else 1
        docs = [
            self.document(
                title=opt_str(item, "title") or opt_str(item, "link"),
                text=opt_str(item, "snippet"),
                url=opt_str(item, "link"),
                score=None,
                rank=offset + rank,
            )
            for rank, item in enumerate(i for i in organic if isinstance(i, dict) and opt_str(i, "link"))
        ]
        require_items(organic, docs, self.name)
        if featured is not None:
            docs.insert(0, featured)
        return docs[:k]

    def _featured(self, answer: dict[str, Any], query: str) -> Document | None:
        """The answer box, else the knowledge graph, as a first document; None when absent."""
        box = answer.get("answerBox")
        if isinstance(box, dict):
            text = opt_str(box, "answer") or opt_str(box, "snippet")
            if text:
                return self.document(
                    title=opt_str(box, "title") or query,
                    text=text,
                    url=opt_str(box, "link"),
                    score=None,
                    rank=0,
                )
        graph = answer.get("knowledgeGraph")
        if isinstance(graph, dict):
            parts = [opt_str(graph, "description")]
            attributes = graph.get("attributes")
            if isinstance(attributes, dict):
                parts += [f"{k}: {v}" for k, v in attributes.items() if isinstance(v, str)]
            text = "\n".join(p for p in parts if p)
            if text:
                title = opt_str(graph, "title") or query
                kind = opt_str(graph, "type")
                return self.document(
                    title=f"{title} ({kind})" if kind else title,
                    text=text,
                    url=opt_str(graph, "descriptionLink") or opt_str(graph, "website"),
                    score=None,
                    rank=0,
                )
        return None
