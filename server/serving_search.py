"""The server as a retriever: Search-R1's `POST /retrieve` and `GET /v1/search`.

Both run over the configured backend chain (with its retries, breaker and cache), so
SSRL / Search-R1 training and evaluation pipelines can use this server as their retriever.
Unlike a chat request, where a failed search falls back to self-fill, a retrieval request
asked for documents: when every backend fails it answers 502.
"""

from __future__ import annotations

import asyncio
from typing import Any

from router.search.base import Document
from router.search.service import SearchOutcome, SearchService
from server.errors import APIError
from server.protocol import RetrieveRequest, SearchHit, SearchResult

DEFAULT_TOPK = 3  # Search-R1's default


def _failed(outcome: SearchOutcome) -> APIError:
    return APIError(502, f"Search failed: {outcome.error}", code="search_failed", type="server_error")


def _search_r1_document(doc: Document, rank: int) -> dict[str, Any]:
    # Search-R1 packs the title and text into `contents`, one line each.
    return {"id": doc.id or f"{doc.source}-{rank}", "contents": f"{doc.title}\n{doc.text}"}


async def retrieve(search: SearchService, request: RetrieveRequest) -> dict[str, Any]:
    k = request.topk or DEFAULT_TOPK
    outcomes = await asyncio.gather(*(search.search(q, k) for q in request.queries))
    result = []
    for outcome in outcomes:
        if outcome.error is not None:
            raise _failed(outcome)
        docs = [_search_r1_document(d, i) for i, d in enumerate(outcome.documents)]
        if request.return_scores:
            result.append(
                [
                    {"document": doc, "score": d.score if d.score is not None else 0.0}
                    for doc, d in zip(docs, outcome.documents, strict=True)
                ]
            )
        else:
            result.append(docs)
    return {"result": result}


async def search_once(search: SearchService, query: str, k: int) -> SearchResult:
    if not query.strip():
        raise APIError(400, "The query `q` must not be empty.", param="q", code="invalid_value")
    outcome = await search.search(query, k)
    if outcome.error is not None:
        raise _failed(outcome)
    return SearchResult(
        query=query,
        backend=outcome.backend,
        latency_s=round(outcome.latency_s, 6),
        cache_hit=getattr(outcome, "cache_hit", False),
        data=[
            SearchHit(title=d.title, url=d.url, snippet=d.text, score=d.score, source=d.source)
            for d in outcome.documents
        ],
    )
