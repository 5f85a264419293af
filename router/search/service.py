"""Calling search for the loop: a chain of backends, a deadline, and failures as values.

The loop never sees an exception from search: a failed or timed-out call comes back as
an outcome with `error` set, and the loop falls back to letting the model fill the
information itself, saying so in the trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from router.search.base import Document, SearchBackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOutcome:
    documents: list[Document] = field(default_factory=list)
    # The backend that answered (or the last one tried).
    backend: str = ""
    latency_s: float = 0.0
    # Why the search failed, or None. One entry per backend tried, in order.
    error: str | None = None


class SearchService:
    """Tries each backend in order until one answers within its deadline."""

    def __init__(self, backends: Sequence[SearchBackend], timeout_s: float = 10.0) -> None:
        self.backends = list(backends)
        self.timeout_s = timeout_s

    @property
    def name(self) -> str:
        return ",".join(b.name for b in self.backends) or "none"

    async def search(self, query: str, k: int) -> SearchOutcome:
        started = time.perf_counter()
        errors: list[str] = []
        last = "none"
        for backend in self.backends:
            last = backend.name
            try:
                docs = await asyncio.wait_for(backend.search(query, k), self.timeout_s)
            except TimeoutError:
                errors.append(f"{backend.name}: timed out after {self.timeout_s:g}s")
            except Exception as exc:  # any backend failure becomes a fallback, never a 500
                errors.append(f"{backend.name}: {type(exc).__name__}: {exc}")
                logger.warning("search backend %s failed: %s", backend.name, type(exc).__name__)
            else:
                return SearchOutcome(list(docs)[:k], backend.name, time.perf_counter() - started)
        if not self.backends:
            errors.append("no search backend is configured")
        return SearchOutcome([], last, time.perf_counter() - started, "; ".join(errors))

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()
