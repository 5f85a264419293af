"""A Search-R1 retrieval server (``retrieval_server.py``: e5 or BM25 over a Wikipedia dump).

``POST {base}/retrieve`` with ``{"queries": [q], "topk": k, "return_scores": true}``. The
answer holds one list per query: ``{"result": [[{"document": {"id", "contents"}, "score"}]]}``,
or ``{"result": [[{"id", "contents"}]]}`` from a server that ignores ``return_scores``.
``contents`` is the corpus row, ``"Title"\\ntext`` (the title quoted in the wiki-18 dump).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.search.base import Document
from router.search.providers.config import COMMON_HTTP_OPTIONS, Options
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

# The reference server's default port.
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
MAX_TOPK = 100


def split_contents(contents: str) -> tuple[str, str]:
    """``(title, text)`` from a ``"Title"\\ntext`` corpus row; quotes around the title dropped."""
    title, _, text = contents.partition("\n")
    title = title.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1].strip()
    return title, text.strip()


class RetrieverBackend(HttpBackend):
    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        settings: HttpSettings | None = None,
        name: str = "retriever",
    ) -> None:
        super().__init__(name=name, base_url=base_url, settings=settings)

    @classmethod
    def from_options(cls, options: Mapping[str, str], secrets: Mapping[str, str]) -> RetrieverBackend:
        opts = Options("retriever", options, COMMON_HTTP_OPTIONS)
        return cls(
            base_url=opts.get("base_url") or DEFAULT_BASE_URL,
            settings=opts.http_settings(),
            name=opts.get("name") or "retriever",
        )

    async def search(self, query: str, k: int) -> list[Document]:
        query = cut_query(query)
        if not query or k <= 0:
            return []
        body = {
            "queries": [query],
            "topk": clamp(k, 1, MAX_TOPK),
            "return_scores": True,
        }
        answer = await self.request_object("POST", "/retrieve", json_body=body)
        if "result" not in answer:
            raise shape_error(self.name, "no 'result'")
        per_query = expect_list(answer["result"], self.name, "'result'")
        if not per_query:
            raise shape_error(self.name, "'result' has no list for the query")
        hits = expect_list(per_query[0], self.name, "'result[0]'")
        docs: list[Document] = []
        for hit in hits:
            parsed = self._parse_hit(hit)
            if parsed is None:
                continue
            document, score = parsed
            title, text = split_contents(opt_str(document, "contents"))
            raw_id = document.get("id")
            docs.append(
                self.document(
                    title=title,
                    text=text,
                    url=opt_str(document, "url") or None,
                    score=score,
                    rank=len(docs),
                    doc_id=None if raw_id is None else str(raw_id),
                )
            )
        require_items(hits, docs, self.name)
        return docs[:k]

    @staticmethod
    def _parse_hit(hit: Any) -> tuple[dict[str, Any], float | None] | None:
        """``(document, score)`` from either answer shape; None for an unusable hit."""
        if not isinstance(hit, dict):
            return None
        if isinstance(hit.get("document"), dict):  # with scores
            document, score = hit["document"], opt_float(hit, "score")
        else:  # without: the hit is the document
            document, score = hit, None
        if not opt_str(document, "contents").strip():
            return None
        return document, score
