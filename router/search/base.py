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
    """A search that failed (transport, HTTP status, malformed answer). Never a crash.

    Messages must never contain a provider key: backends build them from the status, the
    provider's name and the error class, never from request URLs or headers.
    """


class SearchTransportError(SearchError):
    """No usable answer arrived: connection refused or reset, DNS, a read that timed out."""


class SearchHTTPError(SearchError):
    """The provider answered with an error status."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        # Seconds the provider asked us to wait (`Retry-After`), when it said.
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


class SearchResponseError(SearchError):
    """The provider answered 2xx with something that is not its documented shape."""


@runtime_checkable
class SearchBackend(Protocol):
    """An async search provider: a query and k in, at most k ranked documents out."""

    name: str

    async def search(self, query: str, k: int) -> list[Document]: ...

    async def aclose(self) -> None: ...
