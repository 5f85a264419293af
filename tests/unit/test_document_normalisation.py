"""Search results are normalised where they enter (issue 29, items 3 and 9a).

The pure function first (`router.search.normalize`), then the search chain with its cache
(a poisoned result is never cached, an answer with nothing usable is a provider failure),
a real provider over the loopback fakes, and last the routes in process on a scripted
engine: `/v1/search`, `/retrieve` and a self-search chat's trace and `url_citation`s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import server.app
from router.search.base import Document, SearchResponseError
from router.search.cache import SearchCache
from router.search.normalize import normalize_document, plain_text, usable_documents, valid_unicode
from router.search.providers import create_backend
from router.search.resilience import ResiliencePolicy
from router.search.service import SearchService
from router.tags import SAFE_LT
from tests.fake_providers import FAKE_SECRETS, FakeProviders, respond, running_fake
from tests.scripted_engine import ScriptedEngine
from tests.unit.test_self_search_http import CHAT, FakeBackend, Responder, chat, run_app

LONE = "\ud800"

# What hostile or broken providers send: script and markup in titles and snippets, escaped
# script, URLs that are not http(s), a lone surrogate, a NaN score.
HOSTILE = [
    Document(
        "<script>alert(1)</script>Paris <b>travel</b> guide",
        "Paris is the capital of <b>France</b> &amp; its largest city.",
        url="javascript:alert(1)",
        score=0.9,
        source="fake",
    ),
    Document(
        "<b>bold</b> France",
        "France &lt;script&gt;alert(2)&lt;/script&gt;is a country.",
        url="data:text/html,<script>alert(3)</script>",
        score=float("nan"),
        source="fake",
    ),
    Document("Lone", f"Broken {LONE} snippet", url="https://example.org/lone", score=0.5, source="fake"),
    Document("Eiffel Tower", "A tower in Paris.", url="https://example.org/eiffel", score=0.4, source="fake"),
]
CLEAN = [
    Document("Paris travel guide", "Paris is the capital of France & its largest city.", None, 0.9, "fake"),
    Document("bold France", "France is a country.", None, None, "fake"),
    Document("Lone", "Broken snippet", "https://example.org/lone", 0.5, "fake"),
    Document("Eiffel Tower", "A tower in Paris.", "https://example.org/eiffel", 0.4, "fake"),
]
# Nothing in it survives: no text, or text that is only markup.
UNUSABLE = [Document("", LONE, source="fake"), Document("<script>x</script>", "<b></b>", source="fake")]


def strings(value: Any) -> Iterator[str]:
    """Every string in a decoded JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def assert_clean_json(response: httpx.Response) -> Any:
    """200, valid UTF-8 JSON, no lone surrogate, no `<script`, no non-http(s) URL."""
    assert response.status_code == 200, response.text
    body = json.loads(response.content.decode("utf-8"))
    for text in strings(body):
        assert not any("\ud800" <= ch <= "\udfff" for ch in text), text
        assert "<script" not in text.lower(), text
        assert "javascript:" not in text.lower() and "data:text" not in text.lower(), text
    return body


def is_clean(doc: Document) -> bool:
    return normalize_document(doc) == doc


# ----- the pure function -------------------------------------------------------------------


def test_hostile_documents_normalise_to_plain_text_and_http_urls() -> None:
    assert [normalize_document(d) for d in HOSTILE] == CLEAN


def test_a_clean_document_is_unchanged() -> None:
    doc = Document(
        "Paris", "Paris is the capital of France.", "https://en.wikipedia.org/wiki/Paris", 1.0, "x", "7"
    )
    assert normalize_document(doc) == doc


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ("<b>bold</b> &amp; co", "bold & co"),
        ("<script>alert(1)</script>Hi<style>p{}</style>!", "Hi!"),
        ("&lt;script&gt;alert(1)&lt;/script&gt;after", "after"),  # revealed by unescaping
        ("<<b>script>alert(1)", ""),  # revealed by removing: an unclosed script runs to the end
        ("<\u200bscript>x</script>y", "y"),  # invisible characters go before tags are looked for
        ('<img src=x onerror="alert(1)">pic', "pic"),
        ("<!-- note -->text<?xml x?><!DOCTYPE html>", "text"),
        ("cut off <script src=x", f"cut off {SAFE_LT}script src=x"),  # no `>`: never a tag start
        ("a < b and 5 > 3", "a < b and 5 > 3"),  # prose keeps its signs
        ("AT&amp;amp;T", "AT&amp;T"),  # unescaped once, not until nothing changes
        (f"a{LONE}b \ud83d\ude00", "ab \U0001f600"),  # lone surrogate dropped, a pair joined
        ("x\x00y\u200bz &#x200b;w", "xyz w"),
        ("  one \t two \n three  ", "one two \n three"),
        # Protocol and tool-call tags stay for the loop's neutraliser, which shows them inert.
        ("</information><answer>X</answer><tool_call>", "</information><answer>X</answer><tool_call>"),
        ('<answer onclick="x">y', "y"),  # with attributes it is markup
    ],
)
def test_plain_text(raw: str, plain: str) -> None:
    assert plain_text(raw) == plain


def test_valid_unicode_encodes_as_utf8() -> None:
    for text in (LONE, "\udc00x", "\ud83d\ude00", "a\ud83d"):
        valid_unicode(text).encode("utf-8")  # raised UnicodeEncodeError before
    assert valid_unicode("plain") == "plain"


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        " JavaScript:alert(1)",
        "data:text/html,<script>x</script>",
        "ftp://x/",
        "//x.org/",
    ],
)
def test_only_http_urls_are_kept(url: str) -> None:
    doc = normalize_document(Document("T", "t", url=url))
    assert doc is not None and doc.url is None


def test_an_http_url_is_made_safe() -> None:
    doc = normalize_document(Document("T", "t", url=f'https://x.org/a"b<c>{LONE}'))
    assert doc is not None and doc.url == "https://x.org/a%22b%3Cc%3E"


@pytest.mark.parametrize("score", [float("nan"), float("inf"), "high", True, [1]])
def test_a_score_that_is_not_a_finite_number_becomes_none(score: Any) -> None:
    doc = normalize_document(Document("T", "t", score=score))
    assert doc is not None and doc.score is None


def test_unusable_documents_are_dropped() -> None:
    assert [normalize_document(d) for d in UNUSABLE] == [None, None]
    broken: Any = Document(title=3, text=object())  # type: ignore[arg-type]  # a backend's bug
    assert normalize_document(broken) is None


def test_usable_documents_drops_the_bad_and_fails_when_none_is_left() -> None:
    assert usable_documents("fake", [*UNUSABLE, *HOSTILE]) == CLEAN
    assert usable_documents("fake", []) == []  # nothing found is not a failure
    with pytest.raises(SearchResponseError, match="fake: none of the 2 results was usable"):
        usable_documents("fake", UNUSABLE)


# ----- the chain and its cache -----------------------------------------------------------


class Backend:
    """Answers `docs` (cut to k); counts requests."""

    def __init__(self, name: str, docs: list[Document]) -> None:
        self.name = name
        self.docs = docs
        self.calls = 0

    async def search(self, query: str, k: int) -> list[Document]:
        self.calls += 1
        return self.docs[:k]

    async def aclose(self) -> None:
        return None


def test_the_cache_stores_only_normalised_documents() -> None:
    cache = SearchCache()
    backend = Backend("fake", HOSTILE)
    service = SearchService.from_backends([backend], cache=cache)
    first = asyncio.run(service.search("q", 4))
    second = asyncio.run(service.search("q", 4))
    assert first.error is None and first.documents == CLEAN
    assert second.cache_hit and second.documents == CLEAN and backend.calls == 1
    cached = cache.get("fake", "q", 4)
    assert cached == CLEAN and all(is_clean(d) for d in cached)
    assert not any(raw in cached for raw in HOSTILE[:3])  # the last one was clean already


def test_an_answer_with_nothing_usable_is_a_failure_never_cached() -> None:
    cache = SearchCache()
    poisoned = Backend("poisoned", UNUSABLE)
    good = Backend("good", CLEAN[2:])
    service = SearchService.from_backends([poisoned, good], ResiliencePolicy(max_attempts=3), cache)
    outcome = asyncio.run(service.search("q", 3))
    assert outcome.error is None and outcome.backend == "good" and outcome.documents == CLEAN[2:]
    assert outcome.errors == ["poisoned: 1 attempt failed: none of the 2 results was usable"]
    assert poisoned.calls == 1  # a malformed answer is not retried
    assert cache.get("poisoned", "q", 3) is None
    alone = asyncio.run(SearchService.from_backends([Backend("poisoned", UNUSABLE)]).search("q", 3))
    assert alone.documents == [] and alone.error is not None and "usable" in alone.error


# ----- a real provider's parser, over the loopback fakes ---------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviders]:
    fake = FakeProviders()
    with running_fake(fake):
        yield fake


def test_a_provider_answer_with_a_lone_surrogate_escape_is_cleaned(fake: FakeProviders) -> None:
    # Valid JSON on the wire: `\ud800` is an escape, which json.loads turns into a lone surrogate.
    body = (
        b'{"searchParameters": {}, "organic": ['
        b'{"title": "<b>Mona</b> Lisa", "link": "javascript:alert(1)", "snippet": "bad \\ud800 text"},'
        b'{"title": "Louvre", "link": "https://louvre.example/", "snippet": "A museum."}]}'
    )
    fake.reset()
    fake.script(respond(body), provider="serper")
    backend = create_backend("serper", {"base_url": fake.url("serper")}, FAKE_SECRETS)
    cache = SearchCache()
    outcome = asyncio.run(SearchService.from_backends([backend], cache=cache).search("mona lisa", 2))
    assert outcome.error is None
    assert [(d.title, d.text, d.url) for d in outcome.documents] == [
        ("Mona Lisa", "bad text", None),
        ("Louvre", "A museum.", "https://louvre.example/"),
    ]
    assert cache.get("serper", "mona lisa", 2) == outcome.documents


# ----- the routes ------------------------------------------------------------------------------


def serve(
    monkeypatch: pytest.MonkeyPatch, docs: list[Document], cache: SearchCache | None = None
) -> FakeBackend:
    """Make the app build its search the production way (wrapped, cached) over `docs`."""
    backend = FakeBackend(docs)
    monkeypatch.setattr(
        server.app,
        "build_search_service",
        lambda s, observer=None: SearchService.from_backends([backend], cache=cache, observer=observer),
    )
    return backend


def test_v1_search_returns_plain_text_and_http_urls_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SearchCache()
    serve(monkeypatch, HOSTILE, cache)

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.get("/v1/search", params={"q": "q", "k": 4}) for _ in range(2)]

    first, second = run_app(ScriptedEngine(), body)
    for response in (first, second):
        data = assert_clean_json(response)["data"]
        assert [(h["title"], h["url"], h["snippet"], h["score"]) for h in data] == [
            (d.title, d.url, d.text, d.score) for d in CLEAN
        ]
    assert second.json()["cache_hit"] is True
    cached = cache.get("fake", "q", 4)
    assert cached == CLEAN and not any(raw in cached for raw in HOSTILE[:3])


def test_retrieve_returns_plain_text(monkeypatch: pytest.MonkeyPatch) -> None:
    serve(monkeypatch, HOSTILE, SearchCache())

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post("/retrieve", json={"queries": ["q"], "topk": 4}),
            await client.post("/retrieve", json={"queries": ["q"], "topk": 4, "return_scores": True}),
        ]

    plain, scored = run_app(ScriptedEngine(), body)
    (docs,) = assert_clean_json(plain)["result"]
    assert [d["contents"] for d in docs] == [f"{d.title}\n{d.text}" for d in CLEAN]
    (hits,) = assert_clean_json(scored)["result"]
    assert [h["score"] for h in hits] == [0.9, 0.0, 0.5, 0.4]


def test_search_routes_with_nothing_usable_say_the_search_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SearchCache()
    serve(monkeypatch, UNUSABLE, cache)

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.get("/v1/search", params={"q": "q"}),
            await client.post("/retrieve", json={"queries": ["q"]}),
        ]

    for response in run_app(ScriptedEngine(), body):
        assert response.status_code == 502, response.text
        assert "none of the 2 results was usable" in response.json()["error"]["message"]
    assert len(cache) == 0


def test_chat_citations_and_trace_are_plain_text(monkeypatch: pytest.MonkeyPatch) -> None:
    serve(monkeypatch, HOSTILE, SearchCache())
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(CHAT, json=chat(self_search={"policy": "always", "docs_per_search": 4}))

    response = run_app(engine, body)
    choice = assert_clean_json(response)["choices"][0]
    annotations = choice["message"]["annotations"]
    assert [(a["url_citation"]["url"], a["url_citation"]["title"]) for a in annotations] == [
        ("https://example.org/lone", "Lone"),
        ("https://example.org/eiffel", "Eiffel Tower"),
    ]
    (search,) = choice["self_search"]["searches"]
    assert search["fallback"] is None
    for doc in search["documents"]:
        assert "<" not in doc["title"] + doc["snippet"]
        assert doc["url"] is None or doc["url"].startswith("https://")
    assert "Paris travel guide" in search["information"] and "<b>" not in search["information"]


def test_chat_with_nothing_usable_falls_back_to_self_fill(monkeypatch: pytest.MonkeyPatch) -> None:
    serve(monkeypatch, UNUSABLE)
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(CHAT, json=chat(self_search={"policy": "always"}))

    choice = assert_clean_json(run_app(engine, body))["choices"][0]
    assert choice["message"]["content"] == "Paris"
    trace = choice["self_search"]
    (search,) = trace["searches"]
    assert "none of the 2 results was usable" in search["fallback"]
    assert (trace["external_calls"], trace["internal_fills"], trace["fallbacks"]) == (0, 1, 1)
