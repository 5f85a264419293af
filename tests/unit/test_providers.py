"""Remote search providers against loopback fakes of their wire formats.

Covers, per provider: the request as the real API expects it, the parsed documents, and the
mapping of every failure mode to SearchTransportError / SearchHTTPError / SearchResponseError;
then that keys never reach messages, reprs, tracebacks or logs; then the registry and secrets.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.search.base import (
    Document,
    SearchBackend,
    SearchError,
    SearchHTTPError,
    SearchResponseError,
    SearchTransportError,
)
from router.search.local_index import LocalIndexBackend
from router.search.providers import BUILTIN, ENTRY_POINT_GROUP, create_backend, load_secrets
from router.search.providers.http import (
    HttpBackend,
    parse_retry_after,
    redact_url_secrets,
    strip_html,
)
from router.search.service import SearchService
from tests.fake_providers import (
    FAKE_KEYS,
    FAKE_SECRETS,
    PROVIDERS,
    FakeDoc,
    FakeProviders,
    close_mid_body,
    hang,
    html_error_page,
    huge_body,
    malformed_json,
    respond,
    running_fake,
    status,
)

KEYED = ("serper", "tavily", "brave", "exa", "google")
QUERY = "who wrote hamlet"


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeProviders]:
    fake = FakeProviders()
    with running_fake(fake):
        yield fake


@pytest.fixture
def fake(fake_server: FakeProviders) -> FakeProviders:
    fake_server.reset()
    return fake_server


def make(fake: FakeProviders, name: str, secrets: dict[str, str] | None = None, **options: str):
    """A backend from the registry, pointed at the fake."""
    opts = {"base_url": fake.url(name), **options}
    if name == "wikipedia":
        opts.setdefault("rest_base_url", fake.url(name))
    return create_backend(name, opts, FAKE_SECRETS if secrets is None else secrets)


def search(backend: SearchBackend, query: str = QUERY, k: int = 3) -> list[Document]:
    async def go() -> list[Document]:
        try:
            return await backend.search(query, k)
        finally:
            await backend.aclose()

    return asyncio.run(go())


def search_error(backend: SearchBackend, query: str = QUERY, k: int = 3) -> SearchError:
    with pytest.raises(SearchError) as info:
        search(backend, query, k)
    return info.value


# --------------------------------------------------------------------------------------------
# Request shapes and parsing, provider by provider


def test_serper_request_and_documents(fake: FakeProviders) -> None:
    docs = search(make(fake, "serper", gl="us"), k=3)
    (req,) = fake.requests_for("serper")
    assert (req.method, req.path) == ("POST", "/search")
    assert req.headers["x-api-key"] == FAKE_KEYS["serper"]
    assert req.json == {"q": QUERY, "num": 3, "gl": "us"}
    assert [d.title for d in docs] == ["Document 0", "Document 1", "Document 2"]
    assert docs[0] == Document(
        title="Document 0",
        text="Text of document 0 about the topic.",
        url="https://example.org/doc/0",
        score=1.0,
        source="serper",
    )
    assert [d.score for d in docs] == [1.0, 0.5, pytest.approx(1 / 3)]


def test_serper_answer_box_comes_first(fake: FakeProviders) -> None:
    fake.extra["serper"] = {
        "answerBox": {"title": "Hamlet", "answer": "William Shakespeare", "link": "https://a/b"}
    }
    docs = search(make(fake, "serper"), k=3)
    assert len(docs) == 3
    assert (docs[0].title, docs[0].text, docs[0].url) == (
        "Hamlet",
        "William Shakespeare",
        "https://a/b",
    )
    assert docs[0].source == "serper"
    assert [d.title for d in docs[1:]] == ["Document 0", "Document 1"]
    assert [d.score for d in docs] == [1.0, 0.5, pytest.approx(1 / 3)]


def test_serper_knowledge_graph_when_no_answer_box(fake: FakeProviders) -> None:
    fake.extra["serper"] = {
        "knowledgeGraph": {
            "title": "Hamlet",
            "type": "Play",
            "description": "Tragedy by William Shakespeare.",
            "descriptionLink": "https://en.wikipedia.org/wiki/Hamlet",
            "attributes": {"Author": "William Shakespeare"},
        }
    }
    first = search(make(fake, "serper"), k=2)[0]
    assert first.title == "Hamlet (Play)"
    assert first.text == "Tragedy by William Shakespeare.\nAuthor: William Shakespeare"
    assert first.url == "https://en.wikipedia.org/wiki/Hamlet"


def test_tavily_request_and_documents(fake: FakeProviders) -> None:
    docs = search(make(fake, "tavily", search_depth="basic"), k=2)
    (req,) = fake.requests_for("tavily")
    assert (req.method, req.path) == ("POST", "/search")
    assert req.headers["authorization"] == f"Bearer {FAKE_KEYS['tavily']}"
    assert req.json == {"query": QUERY, "max_results": 2, "search_depth": "basic"}
    assert [(d.title, d.url, d.score, d.source) for d in docs] == [
        ("Document 0", "https://example.org/doc/0", 0.95, "tavily"),
        ("Document 1", "https://example.org/doc/1", 0.9, "tavily"),
    ]
    assert docs[1].text == "Text of document 1 about the topic."


def test_tavily_k_is_capped_at_20(fake: FakeProviders) -> None:
    fake.docs = [FakeDoc(f"T{i}", f"https://x/{i}", "t", 0.5) for i in range(30)]
    docs = search(make(fake, "tavily"), k=50)
    assert fake.requests[-1].json["max_results"] == 20
    assert len(docs) == 20


def test_brave_request_and_documents(fake: FakeProviders) -> None:
    docs = search(make(fake, "brave", country="us"), k=2)
    (req,) = fake.requests_for("brave")
    assert (req.method, req.path) == ("GET", "/res/v1/web/search")
    assert req.headers["x-subscription-token"] == FAKE_KEYS["brave"]
    assert req.query == {"q": QUERY, "count": "2", "country": "us"}
    # <strong> highlighting stripped; extra snippets appended.
    assert docs[0].text == "Text of document 0 about the topic.\nMore about Document 0."
    assert (docs[0].title, docs[0].url, docs[0].source) == (
        "Document 0",
        "https://example.org/doc/0",
        "brave",
    )
    assert docs[0].score == 1.0 and docs[1].score == 0.5


def test_brave_cuts_query_to_400_chars_and_count_to_20(fake: FakeProviders) -> None:
    docs = search(make(fake, "brave"), query="word " * 200, k=50)
    req = fake.requests[-1]
    assert len(req.query["q"]) <= 400
    assert req.query["count"] == "20"
    assert len(docs) == 12  # everything the fake has; the fake answers 422 past the limits


def test_brave_without_web_results_is_empty(fake: FakeProviders) -> None:
    fake.script(respond({"type": "search", "query": {"original": QUERY}}))
    assert search(make(fake, "brave")) == []


def test_brave_rate_limit_reset_header(fake: FakeProviders) -> None:
    fake.script(status(429, headers={"X-RateLimit-Remaining": "0, 900", "X-RateLimit-Reset": "1, 86400"}))
    err = search_error(make(fake, "brave"))
    assert isinstance(err, SearchHTTPError) and err.retry_after == 1.0


def test_searxng_request_and_documents(fake: FakeProviders) -> None:
    backend = make(fake, "searxng", engines="duckduckgo, wikipedia", categories="general")
    docs = search(backend, k=4)
    (req,) = fake.requests_for("searxng")
    assert (req.method, req.path) == ("GET", "/search")
    assert req.query == {
        "q": QUERY,
        "format": "json",
        "engines": "duckduckgo,wikipedia",
        "categories": "general",
    }
    assert len(docs) == 4  # SearXNG has no count parameter: the page is cut to k
    assert (docs[2].title, docs[2].url, docs[2].score, docs[2].source) == (
        "Document 2",
        "https://example.org/doc/2",
        0.85,
        "searxng",
    )


def test_searxng_403_says_json_is_disabled(fake: FakeProviders) -> None:
    fake.searxng_json = False
    err = search_error(make(fake, "searxng"))
    assert isinstance(err, SearchHTTPError) and err.status == 403 and not err.retryable
    assert "search.formats" in str(err) and "json" in str(err).lower()


def test_exa_request_and_documents(fake: FakeProviders) -> None:
    docs = search(make(fake, "exa", type="auto"), k=2)
    (req,) = fake.requests_for("exa")
    assert (req.method, req.path) == ("POST", "/search")
    assert req.headers["x-api-key"] == FAKE_KEYS["exa"]
    assert req.json == {
        "query": QUERY,
        "numResults": 2,
        "contents": {"text": True},
        "type": "auto",
    }
    assert [(d.title, d.text, d.score, d.source) for d in docs] == [
        ("Document 0", "Text of document 0 about the topic.", 0.95, "exa"),
        ("Document 1", "Text of document 1 about the topic.", 0.9, "exa"),
    ]


def test_exa_falls_back_to_highlights(fake: FakeProviders) -> None:
    fake.script(respond({"results": [{"title": "T", "url": "https://t", "highlights": ["a", "b"]}]}))
    (doc,) = search(make(fake, "exa"))
    assert doc.text == "a\nb" and doc.score == 1.0


def test_google_request_and_documents(fake: FakeProviders) -> None:
    docs = search(make(fake, "google"), k=15)
    (req,) = fake.requests_for("google")
    assert (req.method, req.path) == ("GET", "/customsearch/v1")
    assert req.query == {
        "key": FAKE_KEYS["google"],
        "cx": FAKE_KEYS["google_cx"],
        "q": QUERY,
        "num": "10",  # the API's maximum
    }
    assert len(docs) == 10
    assert (docs[0].title, docs[0].url, docs[0].text, docs[0].source) == (
        "Document 0",
        "https://example.org/doc/0",
        "Text of document 0 about the topic.",
        "google",
    )


def test_google_without_items_is_empty(fake: FakeProviders) -> None:
    fake.docs = []
    assert search(make(fake, "google")) == []


def test_wikipedia_search_then_summaries(fake: FakeProviders) -> None:
    docs = search(make(fake, "wikipedia", user_agent="ssrl-tests/1.0 (ops@x)"), k=3)
    searches = fake.requests_for("wikipedia", "/w/api.php")
    assert len(searches) == 1
    assert searches[0].method == "GET"
    assert searches[0].query == {
        "action": "query",
        "list": "search",
        "format": "json",
        "srsearch": QUERY,
        "srlimit": "3",
    }
    assert searches[0].headers["user-agent"] == "ssrl-tests/1.0 (ops@x)"
    summaries = sorted(r.path for r in fake.requests_for("wikipedia") if r not in searches)
    assert summaries == [f"/api/rest_v1/page/summary/Document_{i}" for i in range(3)]
    assert [d.text for d in docs] == [
        f"Document {i}. Text of document {i} about the topic." for i in range(3)
    ]
    assert (docs[0].title, docs[0].url, docs[0].id, docs[0].source) == (
        "Document 0",
        "https://example.org/doc/0",
        "1000",
        "wikipedia",
    )
    assert [d.score for d in docs] == [1.0, 0.5, pytest.approx(1 / 3)]


def test_wikipedia_falls_back_to_the_stripped_snippet(fake: FakeProviders) -> None:
    fake.script(status(500), provider="wikipedia", path="/api/rest_v1/page/summary/Document_1")
    fake.script(hang(), provider="wikipedia", path="/api/rest_v1/page/summary/Document_2")
    docs = search(make(fake, "wikipedia", timeout="0.2"), k=3)
    assert docs[0].text == "Document 0. Text of document 0 about the topic."
    # The search snippet, its <span class="searchmatch"> removed.
    assert docs[1].text == "Text of document 1 about the topic."
    assert docs[2].text == "Text of document 2 about the topic."
    assert docs[1].url == f"{fake.url('wikipedia')}/wiki/Document_1"


def test_wikipedia_escapes_titles_in_the_summary_path(fake: FakeProviders) -> None:
    fake.docs = [FakeDoc("AC/DC", "https://w/AC/DC", "Band & more.", 1.0)]
    (doc,) = search(make(fake, "wikipedia"), k=1)
    summary = fake.requests[-1]
    assert summary.raw_path == "/api/rest_v1/page/summary/AC%2FDC"
    assert doc.text == "AC/DC. Band & more."


def test_wikipedia_api_error_is_a_response_error(fake: FakeProviders) -> None:
    fake.script(respond({"error": {"code": "srsearch-text-disabled", "info": "x"}}))
    err = search_error(make(fake, "wikipedia"))
    assert isinstance(err, SearchResponseError) and "srsearch-text-disabled" in str(err)


def test_wikipedia_refuses_the_default_httpx_agent(fake: FakeProviders) -> None:
    err = search_error(make(fake, "wikipedia", user_agent="python-httpx/0.28"))
    assert isinstance(err, SearchHTTPError) and err.status == 403


def test_retriever_request_and_documents(fake: FakeProviders) -> None:
    docs = search(make(fake, "retriever"), k=2)
    (req,) = fake.requests_for("retriever")
    assert (req.method, req.path) == ("POST", "/retrieve")
    assert req.json == {"queries": [QUERY], "topk": 2, "return_scores": True}
    assert docs == [
        Document(
            title=f"Document {i}",
            text=f"Text of document {i} about the topic.",
            url=None,
            score=[0.95, 0.9][i],
            source="retriever",
            id=str(i),
        )
        for i in range(2)
    ]


def test_retriever_accepts_the_shape_without_scores(fake: FakeProviders) -> None:
    fake.script(
        respond({"result": [[{"id": "7", "contents": '"Hamlet"\nA play.'}, {"id": 8, "contents": "x\ny"}]]})
    )
    docs = search(make(fake, "retriever"), k=5)
    assert [(d.id, d.title, d.text, d.score) for d in docs] == [
        ("7", "Hamlet", "A play.", 1.0),
        ("8", "x", "y", 0.5),
    ]


@pytest.mark.parametrize("name", PROVIDERS)
def test_text_is_cut_to_the_limit(fake: FakeProviders, name: str) -> None:
    fake.docs = [FakeDoc("Long", "https://l", "word " * 1000, 0.5)]
    (doc,) = search(make(fake, name, max_text_chars="100"), k=1)
    assert 0 < len(doc.text) <= 100


@pytest.mark.parametrize("name", PROVIDERS)
def test_blank_query_or_k_0_makes_no_call(fake: FakeProviders, name: str) -> None:
    assert search(make(fake, name), query="   ") == []
    assert search(make(fake, name), k=0) == []
    assert fake.requests == []


# --------------------------------------------------------------------------------------------
# Failure mapping, every provider


@pytest.mark.parametrize("name", PROVIDERS)
def test_401_is_a_non_retryable_http_error(fake: FakeProviders, name: str) -> None:
    fake.script(status(401))
    err = search_error(make(fake, name))
    assert isinstance(err, SearchHTTPError)
    assert (err.status, err.retryable, err.retry_after) == (401, False, None)
    assert len(fake.requests) == 1  # one attempt; retrying is the caller's choice


@pytest.mark.parametrize("name", KEYED)
def test_a_wrong_key_is_refused_with_401(fake: FakeProviders, name: str) -> None:
    wrong = {env: f"WRONG-{value}" for env, value in FAKE_SECRETS.items()}
    err = search_error(make(fake, name, secrets=wrong))
    assert isinstance(err, SearchHTTPError) and err.status == 401
    assert "WRONG" not in str(err)  # the fake echoed the presented key in its body


@pytest.mark.parametrize("name", PROVIDERS)
def test_429_retry_after_seconds(fake: FakeProviders, name: str) -> None:
    fake.script(status(429, retry_after=1))
    err = search_error(make(fake, name))
    assert isinstance(err, SearchHTTPError)
    assert (err.status, err.retryable, err.retry_after) == (429, True, 1.0)


@pytest.mark.parametrize("name", PROVIDERS)
def test_429_retry_after_http_date(fake: FakeProviders, name: str) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    fake.script(status(429, retry_after=when))
    err = search_error(make(fake, name))
    assert isinstance(err, SearchHTTPError) and err.retry_after is not None
    assert 60 < err.retry_after <= 121


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("code", [500, 502, 503])
def test_5xx_is_retryable(fake: FakeProviders, name: str, code: int) -> None:
    fake.script(status(code))
    err = search_error(make(fake, name))
    assert isinstance(err, SearchHTTPError) and err.status == code and err.retryable


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("after_headers", [False, True], ids=["before-headers", "mid-body"])
def test_hang_is_a_transport_error(fake: FakeProviders, name: str, after_headers: bool) -> None:
    fake.script(hang(5.0, after_headers=after_headers))
    err = search_error(make(fake, name, timeout="0.1"))
    assert isinstance(err, SearchTransportError)
    assert "ReadTimeout" in str(err)


def test_connection_refused_is_a_transport_error() -> None:
    # A port that nothing listens on: bind one, then close it.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = create_backend("retriever", {"base_url": f"http://127.0.0.1:{port}"}, {})
    err = search_error(backend)
    assert isinstance(err, SearchTransportError) and "ConnectError" in str(err)


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize(
    "behaviour",
    [malformed_json(), html_error_page(), respond({"unexpected": 1}), respond([1, 2])],
    ids=["malformed-json", "html", "missing-fields", "not-an-object"],
)
def test_bad_bodies_are_response_errors(fake: FakeProviders, name: str, behaviour: Any) -> None:
    fake.script(behaviour)
    err = search_error(make(fake, name))
    assert isinstance(err, SearchResponseError)


def test_html_page_is_named_in_the_error(fake: FakeProviders) -> None:
    fake.script(html_error_page())
    assert "HTML" in str(search_error(make(fake, "serper")))


BAD_ITEMS = {
    "serper": {"searchParameters": {}, "organic": [{"title": "no link"}]},
    "tavily": {"results": [{"title": "no url"}]},
    "brave": {"query": {}, "web": {"results": [{"title": "no url"}]}},
    "searxng": {"results": ["not an object"]},
    "exa": {"results": [{"text": "no url"}]},
    "google": {"items": [{"title": "no link"}]},
    "wikipedia": {"query": {"search": [{"pageid": 1}]}},
    "retriever": {"result": [[{"document": {"id": "1"}, "score": 1.0}]]},
}


@pytest.mark.parametrize("name", PROVIDERS)
def test_results_missing_their_fields_are_response_errors(fake: FakeProviders, name: str) -> None:
    fake.script(respond(BAD_ITEMS[name]))
    err = search_error(make(fake, name))
    assert isinstance(err, SearchResponseError)


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("declare_length", [False, True], ids=["streamed", "content-length"])
def test_huge_body_is_a_response_error(fake: FakeProviders, name: str, declare_length: bool) -> None:
    fake.script(huge_body(1_000_000, declare_length=declare_length))
    err = search_error(make(fake, name, max_body_bytes="65536"))
    assert isinstance(err, SearchResponseError) and "65536" in str(err)


def test_default_body_cap_is_2_mib(fake: FakeProviders) -> None:
    fake.script(huge_body(3 * 1024 * 1024))
    err = search_error(make(fake, "serper"))
    assert isinstance(err, SearchResponseError) and str(2 * 1024 * 1024) in str(err)


@pytest.mark.parametrize("name", PROVIDERS)
def test_close_mid_body(fake: FakeProviders, name: str) -> None:
    fake.script(close_mid_body())
    err = search_error(make(fake, name))
    assert isinstance(err, (SearchTransportError, SearchResponseError))


def test_a_closed_backend_refuses_to_search(fake: FakeProviders) -> None:
    backend = make(fake, "serper")

    async def go() -> None:
        await backend.aclose()
        with pytest.raises(SearchError, match="closed"):
            await backend.search(QUERY, 3)

    asyncio.run(go())


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now=now) == 0.0  # in the past
    for junk in (None, "", "soon", "-3", "nan"):
        assert parse_retry_after(junk) is None


def test_strip_html() -> None:
    assert strip_html('<span class="searchmatch">Ham</span>let &amp;  co') == "Hamlet & co"


# --------------------------------------------------------------------------------------------
# Keys never leak


def _all_text(err: BaseException) -> str:
    return "\n".join([str(err), repr(err), *traceback.format_exception(err)])


LEAK_BEHAVIOURS = [
    status(401),
    status(429, retry_after=2),
    status(500),
    hang(5.0),
    hang(5.0, after_headers=True),
    malformed_json(),
    html_error_page(),
    respond({"unexpected": 1}),
    huge_body(200_000),
    close_mid_body(),
]


@pytest.mark.parametrize("name", KEYED)
def test_keys_never_leak(fake: FakeProviders, name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # httpx's own logger too: an imported library (litellm) may have raised its level.
    caplog.set_level(logging.DEBUG, logger="httpx")
    secrets = [FAKE_KEYS[name]] + ([FAKE_KEYS["google_cx"]] if name == "google" else [])
    backend = make(fake, name, timeout="0.2", max_body_bytes="65536")
    texts = [repr(backend), str(backend)]
    asyncio.run(_success_then_each_failure(backend, fake, name, texts))

    # Through the service too: its outcome carries the error text to the trace.
    wrong = {env: f"WRONG-{value}" for env, value in FAKE_SECRETS.items()}
    outcome = asyncio.run(SearchService([make(fake, name, secrets=wrong)]).search(QUERY, 2))
    assert outcome.error and "401" in outcome.error
    texts.append(outcome.error)

    assert len(texts) == 2 + len(LEAK_BEHAVIOURS) + 1
    logged = caplog.text
    assert "HTTP Request" in logged  # httpx's request lines were captured (and redacted)
    for secret in secrets:
        for text in texts:
            assert secret not in text
        assert secret not in logged
        assert "WRONG" not in "".join(texts) + logged


async def _success_then_each_failure(
    backend: SearchBackend, fake: FakeProviders, name: str, texts: list[str]
) -> None:
    try:
        assert await backend.search(QUERY, 2)  # a success, logged by httpx with its URL
        for behaviour in LEAK_BEHAVIOURS:
            fake.script(behaviour, provider=name)
            try:
                await backend.search(QUERY, 2)
            except SearchError as err:
                # Raised fresh: no httpx exception (whose message has the URL) attached.
                assert err.__cause__ is None and err.__context__ is None
                texts.append(_all_text(err))
            else:
                raise AssertionError(f"{behaviour.kind} did not fail")
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    "error", [httpx.ReadError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.DecodingError]
)
def test_httpx_messages_with_the_url_are_not_passed_on(error: type[httpx.RequestError]) -> None:
    backend = create_backend("google", {}, FAKE_SECRETS)
    assert isinstance(backend, HttpBackend)

    def handler(request: httpx.Request) -> httpx.Response:
        raise error(f"failed on {request.url}", request=request)

    # Swap in a transport that fails with the full URL (key included) in its message.
    backend._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    err = search_error(backend)
    assert isinstance(err, (SearchTransportError, SearchResponseError))
    assert error.__name__ in str(err)
    assert FAKE_KEYS["google"] not in _all_text(err)


def test_google_request_lines_are_logged_redacted(
    fake: FakeProviders, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    search(make(fake, "google"))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert "key=***" in line and "cx=***" in line and "/customsearch/v1" in line


def test_redact_url_secrets() -> None:
    text = 'GET https://u:pw@h/x?q=1&key=AIza123&api_key=s3&cx=c "200"'
    assert redact_url_secrets(text) == 'GET https://***@h/x?q=1&key=***&api_key=***&cx=*** "200"'


def test_repr_shows_no_key(fake: FakeProviders) -> None:
    for name in KEYED:
        backend = make(fake, name)
        for secret in FAKE_SECRETS.values():
            assert secret not in repr(backend)
        assert name in repr(backend)
        asyncio.run(backend.aclose())


# --------------------------------------------------------------------------------------------
# Registry and secrets


def test_every_builtin_is_a_search_backend(tmp_path: Path) -> None:
    options = {
        "searxng": {"base_url": "http://127.0.0.1:1"},
        "local": {"index_dir": str(tmp_path)},
    }
    assert set(BUILTIN) == {
        "serper", "tavily", "brave", "searxng", "exa", "google", "wikipedia", "retriever", "local"
    }  # fmt: skip
    for name in BUILTIN:
        backend = create_backend(name, options.get(name, {}), FAKE_SECRETS)
        assert isinstance(backend, SearchBackend)
        assert backend.name == name
        asyncio.run(backend.aclose())


def test_local_maps_to_the_local_index(tmp_path: Path) -> None:
    backend = create_backend("local", {"index_dir": str(tmp_path), "name": "wiki"}, {})
    assert isinstance(backend, LocalIndexBackend)
    assert (backend.index_dir, backend.name) == (tmp_path, "wiki")
    with pytest.raises(ValueError, match="index_dir"):
        create_backend("local", {}, {})


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown search backend 'bing'") as info:
        create_backend("bing", {}, {})
    for name in BUILTIN:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "secrets", "env_name"),
    [
        ("serper", {}, "SERPER_API_KEY"),
        ("tavily", {}, "TAVILY_API_KEY"),
        ("brave", {"BRAVE_API_KEY": "  "}, "BRAVE_API_KEY"),
        ("exa", {}, "EXA_API_KEY"),
        ("google", {}, "GOOGLE_API_KEY"),
        ("google", {"GOOGLE_API_KEY": "g-VALUE"}, "GOOGLE_CSE_ID"),
    ],
)
def test_missing_key_names_the_variable(name: str, secrets: dict[str, str], env_name: str) -> None:
    with pytest.raises(ValueError, match=env_name) as info:
        create_backend(name, {}, secrets)
    assert "VALUE" not in str(info.value)


def test_keys_with_control_characters_are_refused_without_echo() -> None:
    with pytest.raises(ValueError, match="SERPER_API_KEY") as info:
        create_backend("serper", {}, {"SERPER_API_KEY": "abc\ndef-VALUE"})
    assert "VALUE" not in str(info.value)


def test_options_are_parsed_and_checked() -> None:
    backend = create_backend(
        "serper",
        {"timeout": "2.5", "connect_timeout": "1", "max_connections": "4", "name": "serper-eu"},
        FAKE_SECRETS,
    )
    assert isinstance(backend, HttpBackend)
    assert (backend.settings.timeout, backend.settings.connect_timeout) == (2.5, 1.0)
    assert backend.settings.max_connections == 4 and backend.name == "serper-eu"
    assert backend.base_url == "https://google.serper.dev"
    asyncio.run(backend.aclose())
    with pytest.raises(ValueError, match="timout"):
        create_backend("serper", {"timout": "2"}, FAKE_SECRETS)
    with pytest.raises(ValueError, match="timeout must be a number"):
        create_backend("serper", {"timeout": "fast"}, FAKE_SECRETS)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        create_backend("serper", {"timeout": "0"}, FAKE_SECRETS)
    with pytest.raises(ValueError, match="base_url"):
        create_backend("serper", {"base_url": "ftp://x"}, FAKE_SECRETS)
    with pytest.raises(ValueError, match="base_url"):
        create_backend("searxng", {}, {})
    with pytest.raises(ValueError, match="lang"):
        create_backend("wikipedia", {"lang": "en.evil.com/"}, {})


def test_defaults_follow_the_documented_limits() -> None:
    backend = create_backend("wikipedia", {"lang": "de"}, {})
    assert isinstance(backend, HttpBackend)
    assert backend.base_url == "https://de.wikipedia.org"
    assert (backend.settings.connect_timeout, backend.settings.timeout) == (3.0, 10.0)
    assert (backend.settings.max_body_bytes, backend.settings.max_text_chars) == (2097152, 2000)
    asyncio.run(backend.aclose())


class _CustomBackend:
    def __init__(self, options: Any, secrets: Any) -> None:
        self.name = "custom"
        self.options, self.secrets = dict(options), dict(secrets)

    async def search(self, query: str, k: int) -> list[Document]:
        return [Document(title="c", text=query, source=self.name)][:k]

    async def aclose(self) -> None:
        pass


def make_custom(options: Any, secrets: Any) -> _CustomBackend:
    return _CustomBackend(options, secrets)


def make_not_a_backend(options: Any, secrets: Any) -> object:
    return object()


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    eps = [
        importlib.metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
        for name, value in targets.items()
    ]

    def entry_points(**params: Any) -> list[importlib.metadata.EntryPoint]:
        assert params == {"group": ENTRY_POINT_GROUP}
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_entry_point_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_entry_points(
        monkeypatch,
        custom=f"{__name__}:make_custom",
        broken=f"{__name__}:make_not_a_backend",
        serper=f"{__name__}:make_custom",
    )
    backend = create_backend("custom", {"x": "1"}, {"K": "v"})
    assert isinstance(backend, _CustomBackend)
    assert (backend.options, backend.secrets) == ({"x": "1"}, {"K": "v"})
    assert asyncio.run(backend.search("q", 1))[0].text == "q"
    with pytest.raises(TypeError, match="broken"):
        create_backend("broken", {}, {})
    # A built-in name is never taken over by an installed package.
    assert type(create_backend("serper", {}, FAKE_SECRETS)).__name__ == "SerperBackend"
    with pytest.raises(ValueError, match="custom"):
        create_backend("nope", {}, {})


def test_load_secrets_dotenv_with_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    path.write_text(
        "# provider keys\n"
        "\n"
        "SERPER_API_KEY=from-file\n"
        "export TAVILY_API_KEY = 'quoted # kept'\n"
        'BRAVE_API_KEY="brave-file"\n'
        "MY_PLUGIN_TOKEN=plugin\n"
    )
    path.chmod(0o600)
    env = {
        "SERPER_API_KEY": "from-env",
        "BRAVE_API_KEY": "",  # set but empty: does not mask the file
        "HOME": "/root",  # not a secret name: not read
    }
    assert load_secrets(env, path) == {
        "SERPER_API_KEY": "from-env",
        "TAVILY_API_KEY": "quoted # kept",
        "BRAVE_API_KEY": "brave-file",
        "MY_PLUGIN_TOKEN": "plugin",
    }
    assert load_secrets({"MY_PLUGIN_TOKEN": "e"}, None, extra_names=["MY_PLUGIN_TOKEN"]) == {
        "MY_PLUGIN_TOKEN": "e"
    }


def test_load_secrets_json(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text('{"EXA_API_KEY": "exa-file", "GOOGLE_CSE_ID": "cx-file"}')
    assert load_secrets({"GOOGLE_CSE_ID": "cx-env"}, path) == {
        "EXA_API_KEY": "exa-file",
        "GOOGLE_CSE_ID": "cx-env",
    }
    path.write_text('{"EXA_API_KEY": 5}')
    with pytest.raises(ValueError, match="EXA_API_KEY"):
        load_secrets({}, path)


def test_load_secrets_errors_do_not_echo_lines(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    path.write_text("SERPER_API_KEY=ok\nsk-PASTED-WITHOUT-NAME\n")
    with pytest.raises(ValueError, match=r"secrets.env:2") as info:
        load_secrets({}, path)
    assert "PASTED" not in str(info.value)
    with pytest.raises(ValueError, match="not found"):
        load_secrets({}, tmp_path / "missing.env")


def test_load_secrets_warns_about_a_readable_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "secrets.env"
    path.write_text("SERPER_API_KEY=x\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_secrets({}, path)
    assert "readable by other users" in caplog.text
