"""SearchService: a chain of backends, a deadline per call, failures returned as values."""

from __future__ import annotations

import asyncio

from router.search.base import Document, SearchError
from router.search.service import SearchService


class FakeBackend:
    """Answers with `docs`, or raises `error`, or sleeps past any deadline; records queries."""

    def __init__(
        self,
        name: str,
        docs: list[Document] | None = None,
        error: Exception | None = None,
        sleep: float = 0.0,
    ) -> None:
        self.name = name
        self.docs = docs or []
        self.error = error
        self.sleep = sleep
        self.queries: list[tuple[str, int]] = []
        self.closed = False
        self.cancelled = False

    async def search(self, query: str, k: int) -> list[Document]:
        self.queries.append((query, k))
        if self.sleep:
            try:
                await asyncio.sleep(self.sleep)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if self.error is not None:
            raise self.error
        return list(self.docs)

    async def aclose(self) -> None:
        self.closed = True


def docs(n: int, source: str = "fake") -> list[Document]:
    return [Document(title=f"T{i}", text=f"text {i}", url=f"https://x/{i}", source=source) for i in range(n)]


def test_the_first_backend_that_answers_wins() -> None:
    first = FakeBackend("one", docs(2))
    second = FakeBackend("two", docs(2))
    outcome = asyncio.run(SearchService([first, second]).search("capital of France", 2))
    assert outcome.error is None
    assert outcome.backend == "one"
    assert outcome.documents == docs(2)
    assert first.queries == [("capital of France", 2)]
    assert second.queries == []
    assert outcome.latency_s >= 0.0


def test_documents_are_cut_to_k() -> None:
    outcome = asyncio.run(SearchService([FakeBackend("one", docs(5))]).search("q", 3))
    assert [d.title for d in outcome.documents] == ["T0", "T1", "T2"]


def test_a_failing_backend_falls_through_to_the_next() -> None:
    first = FakeBackend("one", error=SearchError("HTTP 502"))
    second = FakeBackend("two", docs(1))
    outcome = asyncio.run(SearchService([first, second]).search("q", 3))
    assert outcome.error is None
    assert outcome.backend == "two"
    assert outcome.documents == docs(1)
    assert first.queries == second.queries == [("q", 3)]


def test_a_slow_backend_times_out_and_the_next_answers() -> None:
    slow = FakeBackend("slow", docs(1), sleep=30.0)
    fast = FakeBackend("fast", docs(2))
    outcome = asyncio.run(SearchService([slow, fast], timeout_s=0.02).search("q", 2))
    assert outcome.error is None
    assert outcome.backend == "fast"
    assert slow.cancelled  # the deadline cancels the slow call rather than leaving it running


def test_every_backend_failing_is_an_outcome_not_an_exception() -> None:
    first = FakeBackend("one", error=RuntimeError("boom"))
    second = FakeBackend("two", sleep=30.0)
    outcome = asyncio.run(SearchService([first, second], timeout_s=0.02).search("q", 2))
    assert outcome.documents == []
    assert outcome.backend == "two"  # the last one tried
    assert outcome.error is not None
    one, two = outcome.error.split("; ")
    assert one == "one: RuntimeError: boom"
    assert two == "two: timed out after 0.02s"


def test_no_backend_is_an_error_outcome() -> None:
    service = SearchService([])
    outcome = asyncio.run(service.search("q", 2))
    assert outcome.documents == []
    assert outcome.backend == "none"
    assert outcome.error == "no search backend is configured"
    assert service.name == "none"


def test_an_empty_result_is_a_success() -> None:
    outcome = asyncio.run(SearchService([FakeBackend("one", [])]).search("q", 2))
    assert outcome.error is None
    assert outcome.documents == []
    assert outcome.backend == "one"


def test_name_and_aclose_cover_every_backend() -> None:
    a, b = FakeBackend("a"), FakeBackend("b")
    service = SearchService([a, b])
    assert service.name == "a,b"
    asyncio.run(service.aclose())
    assert a.closed and b.closed


def test_a_plain_backends_documents_are_normalised_as_they_enter() -> None:
    # Issue 29, item 3: without the wrappers the service is where results enter.
    hostile = [
        Document("<b>Paris</b>", "lone \ud800 surrogate", url="javascript:alert(1)", source="fake"),
        Document("", "\ud800", source="fake"),  # nothing usable left: dropped
    ]
    outcome = asyncio.run(SearchService([FakeBackend("one", hostile)]).search("q", 2))
    assert outcome.error is None
    assert outcome.documents == [Document("Paris", "lone surrogate", url=None, source="fake")]


def test_a_plain_backend_with_nothing_usable_fails_over_to_the_next() -> None:
    poisoned = FakeBackend("one", [Document("<script>x</script>", "\ud800")])
    outcome = asyncio.run(SearchService([poisoned, FakeBackend("two", docs(1))]).search("q", 2))
    assert outcome.error is None and outcome.backend == "two" and outcome.documents == docs(1)
    assert outcome.errors == ["one: none of the 1 results was usable"]
