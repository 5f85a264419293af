"""The interface every search backend implements, and the document it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Document:
    """One ranked search result, whatever backend produced it."""

    title: str
    text: str
    url: str | None = None
    score: float | None = None
    source: str = ""
    id: str | None = None


class SearchError(Exception):
    """A search that failed (transport, HTTP status, malformed answer). Never a crash."""


@runtime_checkable
class SearchBackend(Protocol):
    """An async search provider: a query and k in, at most k ranked documents out."""

    name: str

    async def search(self, query: str, k: int) -> list[Document]: ...

    async def aclose(self) -> None: ...
