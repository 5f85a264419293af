"""The server as a retriever: Search-R1's `POST /retrieve` and `GET /v1/search`.

Both run over the configured backend chain (with its retries, breaker and cache), so
SSRL / Search-R1 training and evaluation pipelines can use this server as their retriever.
Unlike a chat request, where a failed search falls back to self-fill, a retrieval request
asked for documents: when every backend fails it answers 502, and past the key's search
budget (--search-budget-per-day) 429 `search_budget_exceeded`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from router.search.base import Document
from router.search.service import SearchOutcome, SearchService
from server.errors import APIError
from server.protocol import RetrieveRequest, SearchHit, SearchResult
from server.search_budget import SearchBudget, Spent

DEFAULT_TOPK = 3  # Search-R1's default

# A key's budget, the key, and what its request counted (one per query, in order).
KeySpend = tuple[SearchBudget, bytes, list[Spent]]


def _failed(outcome: SearchOutcome) -> APIError:
    return APIError(502, f"Search failed: {outcome.error}", code="search_failed", type="server_error")


def _search_r1_document(doc: Document, rank: int) -> dict[str, Any]:
    # Search-R1 packs the title and text into `contents`, one line each.
    return {"id": doc.id or f"{doc.source}-{rank}", "contents": f"{doc.title}\n{doc.text}"}


async def _refund_free(spend: KeySpend | None, outcomes: list[SearchOutcome]) -> None:
    """Give back what a search counted against the key's budget when it cost no provider call."""
    if spend is None:
        return
    budget, client, taken = spend
    for outcome, spent in zip(outcomes, taken, strict=False):
        if outcome.attempts == 0:
            await budget.refund(client, spent)


async def _spend(spend_on: tuple[SearchBudget, bytes] | None, searches: int) -> KeySpend | None:
    """Count the searches against the key's daily budget first: 429 past it."""
    if spend_on is None:
        return None
    budget, client = spend_on
    if budget.limit_for(client) is None:
        return None
    return budget, client, await budget.spend_or_429(client, searches)


async def retrieve(
    search: SearchService, request: RetrieveRequest, budget: tuple[SearchBudget, bytes] | None = None
) -> dict[str, Any]:
    k = request.topk or DEFAULT_TOPK
    spend = await _spend(budget, len(request.queries))
    outcomes = await asyncio.gather(*(search.search(q, k) for q in request.queries))
    await _refund_free(spend, list(outcomes))
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


async def search_once(
    search: SearchService, query: str, k: int, budget: tuple[SearchBudget, bytes] | None = None
) -> SearchResult:
    if not query.strip():
        raise APIError(400, "The query `q` must not be empty.", param="q", code="invalid_value")
    spend = await _spend(budget, 1)
    outcome = await search.search(query, k)
    await _refund_free(spend, [outcome])
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
