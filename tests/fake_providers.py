"""Loopback fakes of every remote search provider's wire format, scriptable per test.

One Starlette app serves all providers, each under its own path prefix: a backend under test
gets ``fake.url("serper")`` (``http://127.0.0.1:PORT/serper``) as its base URL and calls the
real paths below it (``/search``, ``/res/v1/web/search``, ``/customsearch/v1``...).
Prefixes: serper, tavily, brave, searxng, exa, google, wikipedia, retriever (``PROVIDERS``).

    from tests.fake_providers import FAKE_KEYS, FakeProviders, running_fake, status

    fake = FakeProviders()
    with running_fake(fake):                   # or the pytest fixtures at the bottom
        fake.script(status(429, retry_after=1), provider="serper")  # next serper call: 429
        backend = SerperBackend(FAKE_KEYS["serper"], base_url=fake.url("serper"))
        ...
        assert fake.requests[-1].json == {"q": "q", "num": 3}
        assert len(fake.requests_for("serper")) == 2                 # count retries

FakeProviders(keys=FAKE_KEYS)
    .app                the Starlette app
    .base_url / .url(provider)
                        root URL while running / one provider's base URL
    .script(*behaviours, provider=None, path=None)
                        queue behaviours, one per coming request that matches; ``path`` is a
                        provider-relative prefix (``"/api/rest_v1/page/summary/Foo"``). The most
                        specific non-empty queue wins; nothing queued means ``ok()``.
    .requests           every request received, in order: ``Recorded(provider, method, path,
                        raw_path, query, headers, json, body)``; ``path`` is provider-relative
                        and decoded, ``raw_path`` still percent-encoded, header names lower-case
    .requests_for(provider, path=None)
    .docs               what ``ok()`` answers from: ``FakeDoc(title, url, text, score)``s, cut to
                        the requested count (``default_docs()``: 12)
    .extra[provider]    a dict merged into that provider's ``ok()`` answers
                        (``{"answerBox": {...}}`` for serper)
    .searxng_json       False: SearXNG answers 403, as when its JSON output is disabled
    .reset()            defaults back, queues and requests emptied

Behaviours
    ok()                answer like the real API, credentials checked (below)
    status(code, retry_after=None, body=None, headers=None)
                        an error status; ``retry_after`` in seconds or an HTTP-date string
    respond(body, code=200, headers=None)
                        a given answer: JSON-encoded, or ``bytes`` as they are
    hang(seconds=5.0, after_headers=False)
                        silence before the headers (then ``ok()``), or after part of the body;
                        bounded, and ends early when the client leaves or the server stops
    malformed_json()    a 200 JSON body cut short
    html_error_page(code=200)
                        an HTML page where JSON was expected (a proxy, a captive portal)
    huge_body(n_bytes, declare_length=False)
                        a streamed ``n_bytes`` JSON body, chunked unless the length is declared
    close_mid_body()    headers promising 4 KiB, a few bytes, then the connection dropped
                        (uvicorn logs "ASGI callable returned without completing response")

Credentials checked by ``ok()`` (``FAKE_KEYS``; ``FAKE_SECRETS`` has them by env name):
serper and exa ``x-api-key``, tavily ``Authorization: Bearer``, brave
``X-Subscription-Token``, google ``key`` and ``cx`` query parameters (401 here; the real Google
answers 400), wikipedia a ``User-Agent`` other than httpx's default (else 403). A 401 echoes
the presented key in its body, as some providers do, so tests can check that clients never
copy bodies into errors. Wikipedia: search snippets are a doc's ``text`` with HTML
highlighting; a summary's ``extract`` is ``f"{title}. {text}"``, 404 for an unknown title.
Retriever: honours ``return_scores`` like Search-R1's server.

running_fake(app)       context manager: serve ``app`` (an ASGI app or a ``FakeProviders``) on
                        127.0.0.1 with uvicorn in a thread, on a free port; yields the root URL
Fixtures                ``fake_providers_server`` (module scope, running) and
                        ``fake_providers`` (per test, reset). Import both into a test module
                        (``# noqa: F401, F811`` for linters), or build your own with
                        ``running_fake`` as tests/unit/test_providers.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "FAKE_KEYS",
    "FAKE_SECRETS",
    "Behaviour",
    "FakeDoc",
    "FakeProviders",
    "Recorded",
    "close_mid_body",
    "default_docs",
    "fake_providers",
    "fake_providers_server",
    "hang",
    "html_error_page",
    "huge_body",
    "malformed_json",
    "ok",
    "respond",
    "running_fake",
    "status",
]

# Distinctive values, so a test can grep errors and logs for them.
FAKE_KEYS: dict[str, str] = {
    "serper": "serper-SECRET-4f1c9a",
    "tavily": "tvly-SECRET-77b2e0",
    "brave": "brave-SECRET-0d93aa",
    "exa": "exa-SECRET-c58e14",
    "google": "google-SECRET-9e2f61",
    "google_cx": "cx-SECRET-13ab57",
}
# The same keys by environment-variable name, as `create_backend(..., secrets)` wants them.
FAKE_SECRETS: dict[str, str] = {
    "SERPER_API_KEY": FAKE_KEYS["serper"],
    "TAVILY_API_KEY": FAKE_KEYS["tavily"],
    "BRAVE_API_KEY": FAKE_KEYS["brave"],
    "EXA_API_KEY": FAKE_KEYS["exa"],
    "GOOGLE_API_KEY": FAKE_KEYS["google"],
    "GOOGLE_CSE_ID": FAKE_KEYS["google_cx"],
}
PROVIDERS = ("serper", "tavily", "brave", "searxng", "exa", "google", "wikipedia", "retriever")


@dataclass(frozen=True)
class FakeDoc:
    title: str
    url: str
    text: str
    score: float


def default_docs(n: int = 12) -> list[FakeDoc]:
    return [
        FakeDoc(
            title=f"Document {i}",
            url=f"https://example.org/doc/{i}",
            text=f"Text of document {i} about the topic.",
            score=round(0.95 - 0.05 * i, 4),
        )
        for i in range(n)
    ]


@dataclass(frozen=True)
class Recorded:
    provider: str
    method: str
    path: str
    # The path as sent, still percent-encoded, from the provider prefix on (`path` is decoded).
    raw_path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    body: bytes


# --------------------------------------------------------------------------------------------
# Behaviours


@dataclass(frozen=True)
class Behaviour:
    kind: str
    code: int = 200
    retry_after: str | None = None
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    n_bytes: int = 0
    flag: bool = False


def ok() -> Behaviour:
    """Answer like the real provider (credentials checked)."""
    return Behaviour("ok")


def status(
    code: int,
    retry_after: float | str | None = None,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Behaviour:
    """An error status with a JSON body; ``retry_after`` as seconds or an HTTP date string."""
    return Behaviour(
        "status",
        code=code,
        retry_after=None if retry_after is None else str(retry_after),
        body=body if body is not None else {"error": f"fake error {code}"},
        headers=dict(headers or {}),
    )


def respond(body: Any, code: int = 200, headers: Mapping[str, str] | None = None) -> Behaviour:
    """A given answer: JSON-encoded, or sent as-is when ``bytes``."""
    return Behaviour("respond", code=code, body=body, headers=dict(headers or {}))


def hang(seconds: float = 5.0, after_headers: bool = False) -> Behaviour:
    """Say nothing for up to ``seconds`` (before the headers, or after part of the body)."""
    return Behaviour("hang", seconds=seconds, flag=after_headers)


def malformed_json() -> Behaviour:
    return Behaviour("malformed_json")


def html_error_page(code: int = 200) -> Behaviour:
    """An HTML page where JSON was expected (a proxy or captive portal answering)."""
    return Behaviour("html", code=code)


def huge_body(n_bytes: int, declare_length: bool = False) -> Behaviour:
    """A ``n_bytes`` JSON body, streamed; with ``Content-Length`` when ``declare_length``."""
    return Behaviour("huge", n_bytes=n_bytes, flag=declare_length)


def close_mid_body() -> Behaviour:
    """Headers promising 4 KiB, the first bytes of a JSON body, then the connection dropped."""
    return Behaviour("close_mid_body")


# --------------------------------------------------------------------------------------------
# Raw responses that Starlette's classes cannot express


async def _wait_unless_gone(receive: Receive, seconds: float, stop: threading.Event) -> None:
    """Sleep up to ``seconds``; return early when the client disconnects or the server stops."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        try:
            message = await asyncio.wait_for(receive(), 0.05)
        except TimeoutError:
            continue
        if message["type"] == "http.disconnect":
            return


class _PartialResponse(Response):
    """Start a 200 JSON response promising more than it sends, then hang or hang up."""

    def __init__(self, *, hang_s: float, stop: threading.Event) -> None:
        super().__init__()
        self.hang_s, self.stop = hang_s, stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": b'{"results": [{"title": "par',
                "more_body": True,
            }
        )
        if self.hang_s > 0:
            await _wait_unless_gone(receive, self.hang_s, self.stop)
        # Returning without finishing makes uvicorn close the connection mid-body (it logs an
        # error "ASGI callable returned without completing response": expected here).


async def _huge_chunks(n_bytes: int) -> AsyncIterator[bytes]:
    head, tail = b'{"pad": "', b'"}'
    yield head
    left = max(0, n_bytes - len(head) - len(tail))
    chunk = b"x" * 65536
    while left > 0:
        yield chunk[: min(left, len(chunk))]
        left -= len(chunk)
    yield tail


# --------------------------------------------------------------------------------------------
# The fake


class FakeProviders:
    """All providers' fakes in one app; see the module docstring."""

    def __init__(self, keys: Mapping[str, str] = FAKE_KEYS) -> None:
        self.keys = dict(keys)
        self.base_url: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.reset()
        self.app = Starlette(
            routes=[Route("/{provider}/{path:path}", self._endpoint, methods=["GET", "POST"])]
        )

    def reset(self) -> None:
        with self._lock:
            self.docs: list[FakeDoc] = default_docs()
            self.extra: dict[str, dict[str, Any]] = {}
            self.searxng_json = True
            self.requests: list[Recorded] = []
            self._queues: dict[tuple[str | None, str | None], deque[Behaviour]] = {}

    def url(self, provider: str) -> str:
        if self.base_url is None:
            raise RuntimeError("the fake is not running (use running_fake or the fixtures)")
        return f"{self.base_url}/{provider}"

    def script(self, *behaviours: Behaviour, provider: str | None = None, path: str | None = None) -> None:
        with self._lock:
            self._queues.setdefault((provider, path), deque()).extend(behaviours)

    def requests_for(self, provider: str, path: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if r.provider == provider and (path is None or r.path == path)]

    def _next(self, provider: str, path: str) -> Behaviour:
        def specificity(key: tuple[str | None, str | None]) -> tuple[int, int]:
            return (key[0] is not None, len(key[1] or ""))

        with self._lock:
            for key in sorted(self._queues, key=specificity, reverse=True):
                want_provider, want_path = key
                if want_provider not in (None, provider):
                    continue
                if want_path is not None and not path.startswith(want_path):
                    continue
                if self._queues[key]:
                    return self._queues[key].popleft()
        return ok()

    async def _endpoint(self, request: Request) -> Response:
        provider = request.path_params["provider"]
        path = "/" + request.path_params["path"]
        body = await request.body()
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = None
        self.requests.append(
            Recorded(
                provider=provider,
                method=request.method,
                path=path,
                raw_path=request.scope.get("raw_path", b"")
                .decode("latin-1")
                .split("?")[0][len(provider) + 1 :],
                query=dict(request.query_params),
                headers={k.lower(): v for k, v in request.headers.items()},
                json=parsed,
                body=body,
            )
        )
        behaviour = self._next(provider, path)
        kind = behaviour.kind
        if kind == "ok":
            return self._ok(provider, path, request, parsed)
        if kind == "status":
            headers = dict(behaviour.headers)
            if behaviour.retry_after is not None:
                headers["Retry-After"] = behaviour.retry_after
            return JSONResponse(behaviour.body, behaviour.code, headers=headers)
        if kind == "respond":
            if isinstance(behaviour.body, bytes):
                return Response(behaviour.body, behaviour.code, headers=dict(behaviour.headers))
            return JSONResponse(behaviour.body, behaviour.code, headers=dict(behaviour.headers))
        if kind == "hang":
            if behaviour.flag:
                return _PartialResponse(hang_s=behaviour.seconds, stop=self._stop)
            await _wait_unless_gone(request.receive, behaviour.seconds, self._stop)
            return self._ok(provider, path, request, parsed)
        if kind == "malformed_json":
            return Response(b'{"results": [{"title": "cut', 200, media_type="application/json")
        if kind == "html":
            page = "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
            return Response(page, behaviour.code, media_type="text/html")
        if kind == "huge":
            declared = {"content-length": str(behaviour.n_bytes)} if behaviour.flag else None
            return StreamingResponse(
                _huge_chunks(behaviour.n_bytes), media_type="application/json", headers=declared
            )
        if kind == "close_mid_body":
            return _PartialResponse(hang_s=0.0, stop=self._stop)
        raise ValueError(f"unknown behaviour {kind!r}")

    # ---- the real APIs' answers ------------------------------------------------------------

    def _reject(self, code: int, presented: str) -> Response:
        # Echo the presented key, as some providers do: clients must never copy bodies.
        return JSONResponse({"message": f"Unauthorized: invalid API key {presented!r}"}, code)

    def _ok(self, provider: str, path: str, request: Request, body: Any) -> Response:
        handler = getattr(self, f"_ok_{provider}", None)
        if handler is None:
            return JSONResponse({"error": f"no fake provider {provider!r}"}, 404)
        answer = handler(path, request, body if isinstance(body, dict) else {})
        if isinstance(answer, Response):
            return answer
        answer.update(self.extra.get(provider, {}))
        return JSONResponse(answer)

    def _ok_serper(self, path: str, request: Request, body: dict[str, Any]) -> Any:
        if request.method != "POST" or path != "/search":
            return JSONResponse({"message": "not found"}, 404)
        presented = request.headers.get("x-api-key", "")
        if presented != self.keys["serper"]:
            return self._reject(401, presented)
        if not isinstance(body.get("q"), str):
            return JSONResponse({"message": "Missing query parameter", "statusCode": 400}, 400)
        num = int(body.get("num", 10))
        return {
            "searchParameters": {"q": body["q"], "type": "search", "num": num, "engine": "google"},
            "organic": [
                {"title": d.title, "link": d.url, "snippet": d.text, "position": i + 1}
                for i, d in enumerate(self.docs[:num])
            ],
            "credits": 1,
        }

    def _ok_tavily(self, path: str, request: Request, body: dict[str, Any]) -> Any:
        if request.method != "POST" or path != "/search":
            return JSONResponse({"detail": "Not Found"}, 404)
        presented = request.headers.get("authorization", "")
        if presented != f"Bearer {self.keys['tavily']}":
            return self._reject(401, presented)
        if not isinstance(body.get("query"), str):
            return JSONResponse({"detail": {"error": "query is required"}}, 400)
        n = int(body.get("max_results", 5))
        return {
            "query": body["query"],
            "answer": None,
            "images": [],
            "results": [
                {
                    "title": d.title,
                    "url": d.url,
                    "content": d.text,
                    "score": d.score,
                    "raw_content": None,
                }
                for d in self.docs[:n]
            ],
            "response_time": 0.42,
        }

    def _ok_brave(self, path: str, request: Request, body: dict[str, Any]) -> Any:
        if request.method != "GET" or path != "/res/v1/web/search":
            return JSONResponse({"type": "ErrorResponse"}, 404)
        presented = request.headers.get("x-subscription-token", "")
        if presented != self.keys["brave"]:
            return self._reject(401, presented)
        q = request.query_params.get("q", "")
        count = int(request.query_params.get("count", 20))
        if not q or len(q) > 400 or not 1 <= count <= 20:
            return JSONResponse({"type": "ErrorResponse", "error": {"code": "VALIDATION"}}, 422)
        results = []
        for d in self.docs[:count]:
            first, _, rest = d.text.partition(" ")
            results.append(
                {
                    "title": d.title,
                    "url": d.url,
                    # Brave highlights matches with <strong>.
                    "description": f"<strong>{html.escape(first)}</strong> {html.escape(rest)}",
                    "extra_snippets": [f"More about {d.title}."],
                }
            )
        return {
            "type": "search",
            "query": {"original": q},
            "web": {"type": "search", "results": results},
        }

    def _ok_searxng(self, path: str, request: Request, body: dict[str, Any]) -> Any:
        if request.method != "GET" or path != "/search":
            return Response("Not Found", 404)
        if not self.searxng_json:
            return Response("<html><body>403 Forbidden</body></html>", 403, media_type="text/html")
        if request.query_params.get("format") != "json":
            return Response("<html><body>results</body></html>", 200, media_type="text/html")
        q = request.query_params.get("q", "")
        return {
            "query": q,
            "number_of_results": len(self.docs),
            "results": [
                {
                    "url": d.url,
                    "title": d.title,
                    "content": d.text,
                    "engine": "duckduckgo",
                    "engines": ["duckduckgo"],
                    "score": d.score,
                    "category": "general",
                }
                for d in self.docs
            ],
            "answers": [],
            "suggestions": [],
            "unresponsive_engines": [],
        }

    def _ok_exa(self, path: str, request: Request, body: dict[str, Any]) -> Any:
        if request.method != "POST" or path != "/search":
            return JSONResponse({"error": "not found"}, 404)
        presented = request.headers.get("x-api-key", "")
        if presented != self.keys["exa"]:
            return self._reject(401, presented)
        if not isinstance(body.get("query"), str):
            return JSONResponse({"error": "query is required"}, 400)
        n = int(body.get("numResults", 10))
        contents = body.get("contents")
        with_text = isinstance(contents, dict) and bool(contents.get("text"))
        results = []
        for d in self.docs[:n]:
            result: dict[str, Any] = {
                "id": d.url,
                "title": d.title,
                "url": d.url,
                "publishedDate": None,
                "author": None,
                "score": d.score,
                "highlights": [d.text[:20]],
            }
            if with_text:
                result["text"] = d.text
            results.append(result)
        return {"requestId": "fake-request", "resolvedSearchType": "neural", "results": results}

    def _ok_google(self, path: str, request: Request, body: dict[str, Any]) -> Any:
        if request.method != "GET" or path != "/customsearch/v1":
            return JSONResponse({"error": {"code": 404}}, 404)
        params = request.query_params
        presented = params.get("key", "")
        if presented != self.keys["google"] or params.get("cx") != self.keys["google_cx"]:
            return self._reject(401, presented)
        num = int(params.get("num", 10))
        if not 1 <= num <= 10:
            return JSONResponse({"error": {"code": 400, "message": "Invalid value"}}, 400)
        answer: dict[str, Any] = {
            "kind": "customsearch#search",
            "queries": {"request": [{"searchTerms": params.get("q", ""), "count": num}]},
            "searchInformation": {"totalResults": str(len(self.docs))},
        }
        if self.docs:  # like Google: no `items` at all when nothing matched
            answer["items"] = [
                {
                    "kind": "customsearch#result",
                    "title": d.title,
                    "link": d.url,
                    "displayLink": "example.org",
                    "snippet": d.text,
                }
                for d in self.docs[:num]
            ]
        return answer

    def _ok_wikipedia(self, path: str, request: Request, body: dict[str, Any]) -> Any:
        agent = request.headers.get("user-agent", "")
        if not agent or agent.startswith("python-httpx"):
            return Response("Please set a user-agent and respect our robot policy.", 403)
        summary_prefix = "/api/rest_v1/page/summary/"
        if path.startswith(summary_prefix):
            title = unquote(path[len(summary_prefix) :]).replace("_", " ")
            for d in self.docs:
                if d.title == title:
                    return {
                        "type": "standard",
                        "title": d.title,
                        "displaytitle": d.title,
                        # The lead section: longer than the search snippet, so tests can
                        # tell which of the two a client used.
                        "extract": f"{d.title}. {d.text}",
                        "content_urls": {"desktop": {"page": d.url}, "mobile": {"page": d.url}},
                    }
            return JSONResponse(
                {
                    "type": "https://mediawiki.org/wiki/HyperSwitch/errors/not_found",
                    "title": "Not found.",
                },
                404,
            )
        if path != "/w/api.php":
            return Response("Not Found", 404)
        params = request.query_params
        if (
            params.get("action") != "query"
            or params.get("list") != "search"
            or params.get("format") != "json"
        ):
            return JSONResponse({"error": {"code": "badvalue", "info": "bad request"}})
        limit = int(params.get("srlimit", 10))
        hits = []
        for i, d in enumerate(self.docs[:limit]):
            first, _, rest = d.text.partition(" ")
            snippet = f'<span class="searchmatch">{html.escape(first)}</span> {html.escape(rest)}'
            hits.append({"ns": 0, "title": d.title, "pageid": 1000 + i, "snippet": snippet})
        return {
            "batchcomplete": "",
            "query": {"searchinfo": {"totalhits": len(self.docs)}, "search": hits},
        }

    def _ok_retriever(self, path: str, request: Request, body: dict[str, Any]) -> Any:
        if request.method != "POST" or path != "/retrieve":
            return JSONResponse({"detail": "Not Found"}, 404)
        queries = body.get("queries")
        if not isinstance(queries, list):
            return JSONResponse({"detail": "queries is required"}, 422)
        topk = int(body.get("topk") or 3)
        with_scores = bool(body.get("return_scores", False))
        results = []
        for _ in queries:
            hits = []
            for i, d in enumerate(self.docs[:topk]):
                doc = {"id": str(i), "contents": f'"{d.title}"\n{d.text}'}
                hits.append({"document": doc, "score": d.score} if with_scores else doc)
            results.append(hits)
        return {"result": results}


# --------------------------------------------------------------------------------------------
# Running it


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_fake(app: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (free port, uvicorn in a thread); yield its root URL.

    ``app`` is any ASGI app, or a ``FakeProviders``: then its ``base_url`` is set too, and
    its pending ``hang``s end at shutdown instead of holding it up.
    """
    fake = app if isinstance(app, FakeProviders) else None
    asgi = fake.app if fake is not None else app
    sock = _free_socket()
    root = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        asgi,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="h11",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    if fake is not None:
        fake._stop.clear()
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake provider server did not start")
            time.sleep(0.01)
        if fake is not None:
            fake.base_url = root
        yield root
    finally:
        if fake is not None:
            fake._stop.set()
            fake.base_url = None
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def fake_providers_server() -> Iterator[FakeProviders]:
    """One running fake per test module (starting uvicorn costs more than a test)."""
    fake = FakeProviders()
    with running_fake(fake):
        yield fake


@pytest.fixture
def fake_providers(fake_providers_server: FakeProviders) -> FakeProviders:
    """The module's fake, reset for this test."""
    fake_providers_server.reset()
    return fake_providers_server
