"""A Python client for ssrl (and any OpenAI-compatible server), sync and async, on httpx.

    from clients.client import SSRLClient

    with SSRLClient() as client:            # SSRL_BASE_URL / SSRL_API_KEY, or parameters
        result = client.chat("Who painted the Mona Lisa?", policy="always")
        print(result.answer)
        for search in result.trace.searches:
            print(search.query, search.entropy.mean, search.decision)
        for event in client.stream("Who painted the Mona Lisa?"):
            ...                             # ReasoningDelta, SearchDecided, AnswerDelta, TraceEvent, Usage

Requests that fail to connect, or that the server answers 429 or 503, are retried (at most
`max_retries` more times), waiting what `Retry-After` says (capped at `max_retry_wait`) or,
without it, an exponential backoff. Other errors raise `SSRLAPIError` at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, Self, TypedDict, Unpack

import httpx

from clients.models import (
    Aggregate,
    AnswerDelta,
    ChatResult,
    Choice,
    Citation,
    Decision,
    Document,
    Entropy,
    Mode,
    Model,
    Policy,
    ReasoningDelta,
    RetrievedDocument,
    SearchDecided,
    SearchHit,
    SearchRecord,
    SearchResult,
    StreamEvent,
    Trace,
    TraceEvent,
    Usage,
    Vote,
    VoteSample,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "Aggregate",
    "AnswerDelta",
    "AsyncSSRLClient",
    "ChatOptions",
    "ChatResult",
    "Choice",
    "Citation",
    "Decision",
    "Document",
    "Entropy",
    "Mode",
    "Model",
    "Policy",
    "ReasoningDelta",
    "RetrievedDocument",
    "RetryHook",
    "SSEDecoder",
    "SSRLAPIError",
    "SSRLClient",
    "SSRLConnectionError",
    "SSRLError",
    "SearchDecided",
    "SearchHit",
    "SearchRecord",
    "SearchResult",
    "StreamEvent",
    "Trace",
    "TraceEvent",
    "Usage",
    "Vote",
    "VoteSample",
    "build_chat_body",
    "iter_sse_data",
    "normalize_base_url",
    "parse_chat_response",
    "parse_chunk",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})
# Failures where the request surely did not reach the model: safe to send again.
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
)


# ----- errors -------------------------------------------------------------------------------


class SSRLError(Exception):
    """Base class of the client's errors."""


class SSRLConnectionError(SSRLError):
    """The server could not be reached (or the connection broke), after the retries."""


class SSRLAPIError(SSRLError):
    """The server answered an error status (OpenAI's error shape when it can be read)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        body: Any = None,
    ) -> None:
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        super().__init__(str(self))

    def __str__(self) -> str:
        kind = f" {self.type}" if self.type else ""
        param = f" (param: {self.param})" if self.param else ""
        return f"HTTP {self.status_code}{kind}: {self.message}{param}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> SSRLAPIError:
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return cls(
                response.status_code,
                str(error.get("message") or response.reason_phrase),
                type=error.get("type"),
                param=error.get("param"),
                code=error.get("code"),
                body=body,
            )
        if isinstance(error, str):  # some servers send {"error": "text"}
            return cls(response.status_code, error, body=body)
        text = response.text.strip()[:300] or response.reason_phrase or "error"
        return cls(response.status_code, text, body=body)


# ----- requests and parsing (shared by both clients) ---------------------------------------


def normalize_base_url(url: str) -> str:
    """The server's root URL: the SDK-style ".../v1" is accepted too, since the client adds
    /v1 itself (and /retrieve is at the root)."""
    return url.rstrip("/").removesuffix("/v1")


def _env_base_url(base_url: str | None) -> str:
    return normalize_base_url(base_url or os.environ.get("SSRL_BASE_URL") or DEFAULT_BASE_URL)


def _messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


class ChatOptions(TypedDict, total=False):
    """The options of one chat request, declared once for `chat()` and `stream()` of both
    clients and for `build_chat_body()`. Pass them as keywords (`client.chat(q,
    policy="always")`) or keep a dict and spread it (`client.chat(q, **options)`).

    The first ten are the `self_search` request extension (sent only when set, so a plain
    OpenAI-compatible server never sees it); the rest are OpenAI's sampling fields.
    `extra_body` is merged into the body last (its `self_search` into ours)."""

    policy: Policy | None
    threshold: float | None
    aggregate: Aggregate | None
    mode: Mode | None
    max_turns: int | None
    docs_per_search: int | None
    max_external_calls: int | None
    budget: int | None
    votes: int | None
    enabled: bool | None
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    seed: int | None
    stop: str | list[str] | None
    n: int
    extra_body: Mapping[str, Any] | None


SELF_SEARCH_OPTIONS: tuple[str, ...] = (
    "enabled",
    "mode",
    "policy",
    "threshold",
    "aggregate",
    "max_turns",
    "docs_per_search",
    "max_external_calls",
    "budget",
    "votes",
)
SAMPLING_OPTIONS: tuple[str, ...] = ("temperature", "top_p", "max_tokens", "seed", "stop")


def build_chat_body(
    messages: str | Sequence[Mapping[str, Any]],
    model: str,
    *,
    stream: bool = False,
    **options: Unpack[ChatOptions],
) -> dict[str, Any]:
    """The JSON body of a chat request. `self_search` is sent only when an option is set, so
    a plain OpenAI-compatible server never sees it."""
    unknown = set(options) - set(ChatOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown chat option(s): {', '.join(sorted(unknown))}")
    values: Mapping[str, Any] = options
    body: dict[str, Any] = {"model": model, "messages": _messages(messages)}
    for key in SAMPLING_OPTIONS:
        if values.get(key) is not None:
            body[key] = values[key]
    n = options.get("n", 1)
    if n != 1:
        body["n"] = n
    self_search = {k: values[k] for k in SELF_SEARCH_OPTIONS if values.get(k) is not None}
    if self_search:
        body["self_search"] = self_search
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    extra_body = options.get("extra_body")
    if extra_body:
        for key, value in extra_body.items():
            if key == "self_search" and isinstance(value, Mapping):
                body["self_search"] = {**body.get("self_search", {}), **value}
            else:
                body[key] = value
    return body


def _citations(annotations: Any) -> list[Citation]:
    out = []
    for item in annotations or ():
        if isinstance(item, dict) and item.get("type") == "url_citation":
            data = item.get("url_citation") or {}
            if data.get("url"):
                out.append(Citation.model_validate(data))
    return out


def _trace(value: Any) -> Trace | None:
    if not isinstance(value, dict):
        return None
    return Trace.model_validate({k: v for k, v in value.items() if k != "type"})


def parse_chat_response(data: Mapping[str, Any]) -> ChatResult:
    """A `chat.completion` JSON object as a `ChatResult` (ssrl's or any OpenAI server's)."""
    choices = []
    for i, choice in enumerate(data.get("choices") or ()):
        message = choice.get("message") or {}
        reasoning = message.get("reasoning")
        if reasoning is None:
            reasoning = message.get("reasoning_content")  # vLLM's reasoning parsers
        choices.append(
            Choice(
                index=choice.get("index", i),
                answer=message.get("content") or "",
                reasoning=reasoning,
                trace=_trace(choice.get("self_search")),
                citations=_citations(message.get("annotations")),
                finish_reason=choice.get("finish_reason"),
            )
        )
    usage = data.get("usage")
    return ChatResult(
        id=data.get("id") or "",
        model=data.get("model") or "",
        choices=choices,
        usage=Usage.model_validate(usage) if isinstance(usage, dict) else None,
        raw=dict(data),
    )


_STREAM_ERROR_STATUS = {
    "invalid_request_error": 400,
    "rate_limit_error": 429,
    "server_error": 500,
    "service_unavailable_error": 503,
}


def parse_chunk(chunk: Mapping[str, Any]) -> list[StreamEvent]:
    """The typed events of one `chat.completion.chunk`, in the order they happened."""
    error = chunk.get("error")
    if error is not None:
        # An error after the 200 went out: ssrl sends OpenAI's error object as a chunk.
        info = error if isinstance(error, dict) else {"message": str(error)}
        status = _STREAM_ERROR_STATUS.get(str(info.get("type")), 500)
        raise SSRLAPIError(
            status,
            str(info.get("message") or "error in the stream"),
            type=info.get("type"),
            param=info.get("param"),
            code=info.get("code"),
            body=dict(chunk),
        )
    events: list[StreamEvent] = []
    for choice in chunk.get("choices") or ():
        index = choice.get("index", 0)
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning") or delta.get("reasoning_content")
        if reasoning:
            events.append(ReasoningDelta(text=reasoning, index=index))
        if delta.get("content"):
            events.append(AnswerDelta(text=delta["content"], index=index))
        extension = choice.get("self_search")
        if isinstance(extension, dict) and extension.get("type") == "search":
            events.append(
                SearchDecided(record=SearchRecord.model_validate(extension.get("search") or {}), index=index)
            )
        finish = choice.get("finish_reason")
        is_trace = isinstance(extension, dict) and extension.get("type") == "trace"
        if finish is not None or is_trace:
            events.append(
                TraceEvent(
                    trace=_trace(extension) if is_trace else None,
                    finish_reason=finish,
                    citations=_citations(choice.get("annotations")),
                    index=index,
                )
            )
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        events.append(Usage.model_validate(usage))
    return events


class SSEDecoder:
    """Incremental server-sent-events decoder: feed lines, get each event's `data` payload
    (multi-line data joined); `done` turns true at `data: [DONE]`."""

    def __init__(self) -> None:
        self._buffer: list[str] = []
        self.done = False

    def _emit(self) -> str | None:
        payload = "\n".join(self._buffer)
        self._buffer = []
        if payload == "[DONE]":
            self.done = True
            return None
        return payload

    def feed(self, raw: str) -> str | None:
        line = raw.rstrip("\r\n")
        if not line:
            return self._emit() if self._buffer else None
        if not line.startswith(":"):
            field, _, value = line.partition(":")
            if field == "data":
                self._buffer.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        return self._emit() if self._buffer and not self.done else None


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data:` payloads of a server-sent-event stream, up to `[DONE]`."""
    decoder = SSEDecoder()
    for line in lines:
        payload = decoder.feed(line)
        if payload is not None:
            yield payload
        if decoder.done:
            return
    payload = decoder.flush()
    if payload is not None:
        yield payload


def _events_of(payload: str) -> list[StreamEvent]:
    try:
        chunk = json.loads(payload)
    except ValueError as exc:
        raise SSRLError(f"the server sent an invalid stream chunk: {payload[:200]!r}") from exc
    return parse_chunk(chunk) if isinstance(chunk, dict) else []


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked to wait (`Retry-After-Ms`, `Retry-After` seconds or date)."""
    value = response.headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


RetryHook = Callable[[int, float, str], None]


class _RetryPolicy:
    """When to send a request again and how long to wait first (shared by both clients).

    A request is retried when it failed to connect (`RETRY_EXCEPTIONS`: it surely did not
    reach the model) or was answered 429/503, at most `max_retries` times. The wait is what
    `Retry-After-Ms`/`Retry-After` asked (capped at `max_retry_wait`), else an exponential
    backoff from `backoff` with jitter (75-100% of it), also capped.
    """

    def __init__(
        self, max_retries: int, max_retry_wait: float, backoff: float, on_retry: RetryHook | None
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.backoff = backoff
        self.on_retry = on_retry

    def wait(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            asked = _retry_after(response)
            if asked is not None:
                return float(min(asked, self.max_retry_wait))
        base = min(self.backoff * 2 ** (attempt - 1), self.max_retry_wait)
        return float(base * random.uniform(0.75, 1.0))

    def next_wait(
        self, attempt: int, response: httpx.Response | None, error: BaseException | None
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to stop (attempt is 1-based).

        Calls `on_retry(attempt, wait, reason)` when there will be a retry."""
        if attempt > self.max_retries:
            return None
        if error is not None:
            if not isinstance(error, RETRY_EXCEPTIONS):
                return None
            reason = type(error).__name__
        elif response is not None and response.status_code in RETRY_STATUSES:
            reason = f"HTTP {response.status_code}"
        else:
            return None
        delay = self.wait(attempt, response)
        if self.on_retry is not None:
            self.on_retry(attempt, delay, reason)
        return delay


def _auth_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"Accept": "application/json", "User-Agent": "ssrl-client"}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    out.update(headers or {})
    return out


def _search_result(data: Any) -> SearchResult:
    return SearchResult.model_validate(data)


def _retrieved(data: Any) -> list[list[RetrievedDocument]]:
    out = []
    for hits in (data or {}).get("result", []):
        row = []
        for hit in hits:
            if "document" in hit:  # return_scores: {"document": {...}, "score": s}
                row.append(RetrievedDocument.model_validate({**hit["document"], "score": hit.get("score")}))
            else:
                row.append(RetrievedDocument.model_validate(hit))
        out.append(row)
    return out


def _connection_error(base_url: str, exc: httpx.HTTPError) -> SSRLConnectionError:
    detail = str(exc) or type(exc).__name__
    return SSRLConnectionError(f"cannot reach {base_url}: {detail}")


class _Base:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        max_retries: int,
        max_retry_wait: float,
        backoff: float,
        on_retry: RetryHook | None,
    ) -> None:
        self.base_url = _env_base_url(base_url)
        self.api_key = api_key if api_key is not None else os.environ.get("SSRL_API_KEY")
        self.retry = _RetryPolicy(max_retries, max_retry_wait, backoff, on_retry)
        self._model: str | None = None

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise SSRLAPIError.from_response(response)
        return response


# ----- the sync client ----------------------------------------------------------------------


class SSRLClient(_Base):
    """Sync client. `base_url` defaults to `SSRL_BASE_URL` (else http://127.0.0.1:8000; a
    trailing `/v1` is accepted), `api_key` to `SSRL_API_KEY`. Connection errors and 429/503
    answers are retried up to `max_retries` times, waiting `Retry-After` (at most
    `max_retry_wait` seconds) or an exponential backoff from `backoff`; `on_retry(attempt,
    wait_s, reason)` is called before each wait. `http_client` (or `transport`) replaces the
    httpx client."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 120.0,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        backoff: float = 0.5,
        headers: Mapping[str, str] | None = None,
        on_retry: RetryHook | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, max_retries, max_retry_wait, backoff, on_retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, transport=transport)
        self._headers = _auth_headers(self.api_key, headers)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        request = self._http.build_request(method, self.base_url + path, headers=self._headers, **kwargs)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                delay = self.retry.next_wait(attempt, None, exc)
                if delay is None:
                    raise _connection_error(self.base_url, exc) from exc
            else:
                delay = self.retry.next_wait(attempt, response, None)
                if delay is None:
                    break
                response.close()  # free the connection of the dropped 429/503
            time.sleep(delay)
        if response.status_code >= 400 and stream:
            try:
                response.read()
            finally:
                response.close()
        return self._check(response)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise SSRLError(f"{path}: the server did not answer JSON") from exc

    # -- routes --

    def models(self) -> list[Model]:
        return [Model.model_validate(m) for m in self._json("GET", "/v1/models").get("data", [])]

    def default_model(self) -> str:
        """The first model of /v1/models (asked once per client)."""
        if self._model is None:
            models = self.models()
            if not models:
                raise SSRLError("the server lists no models; pass model=")
            self._model = models[0].id
        return self._model

    def health(self) -> bool:
        """True when `GET /health` answers 200 (no retries)."""
        try:
            return self._http.get(self.base_url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def chat(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        **options: Unpack[ChatOptions],
    ) -> ChatResult:
        """One chat completion: the answer, the typed trace, citations, reasoning, usage."""
        body = build_chat_body(
            messages,
            model or self.default_model(),
            **options,
        )
        return parse_chat_response(self._json("POST", "/v1/chat/completions", json=body))

    def stream(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        **options: Unpack[ChatOptions],
    ) -> Iterator[StreamEvent]:
        """Stream a chat completion as typed events, in the order the server sent them:
        `ReasoningDelta`s, a `SearchDecided` per search (before its information text),
        `AnswerDelta`s, a `TraceEvent` per finished choice, then `Usage`."""
        body = build_chat_body(
            messages,
            model or self.default_model(),
            stream=True,
            **options,
        )
        response = self._send("POST", "/v1/chat/completions", json=body, stream=True)
        try:
            for payload in iter_sse_data(response.iter_lines()):
                yield from _events_of(payload)
        except httpx.HTTPError as exc:
            raise _connection_error(self.base_url, exc) from exc
        finally:
            response.close()

    def search(self, q: str, k: int = 5) -> SearchResult:
        """`GET /v1/search`: the top `k` documents of the server's search backends."""
        return _search_result(self._json("GET", "/v1/search", params={"q": q, "k": k}))

    def retrieve(
        self, queries: str | Sequence[str], topk: int | None = None, *, return_scores: bool = False
    ) -> list[list[RetrievedDocument]]:
        """`POST /retrieve` (Search-R1's retriever): one list of documents per query."""
        body: dict[str, Any] = {"queries": [queries] if isinstance(queries, str) else list(queries)}
        if topk is not None:
            body["topk"] = topk
        if return_scores:
            body["return_scores"] = True
        return _retrieved(self._json("POST", "/retrieve", json=body))


# ----- the async client ---------------------------------------------------------------------


class AsyncSSRLClient(_Base):
    """Async twin of `SSRLClient` (same parameters, `await`/`async for`)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 120.0,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        backoff: float = 0.5,
        headers: Mapping[str, str] | None = None,
        on_retry: RetryHook | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, max_retries, max_retry_wait, backoff, on_retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, transport=transport)
        self._headers = _auth_headers(self.api_key, headers)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        request = self._http.build_request(method, self.base_url + path, headers=self._headers, **kwargs)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                delay = self.retry.next_wait(attempt, None, exc)
                if delay is None:
                    raise _connection_error(self.base_url, exc) from exc
            else:
                delay = self.retry.next_wait(attempt, response, None)
                if delay is None:
                    break
                await response.aclose()
            await asyncio.sleep(delay)
        if response.status_code >= 400 and stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return self._check(response)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise SSRLError(f"{path}: the server did not answer JSON") from exc

    async def models(self) -> list[Model]:
        data = await self._json("GET", "/v1/models")
        return [Model.model_validate(m) for m in data.get("data", [])]

    async def default_model(self) -> str:
        if self._model is None:
            models = await self.models()
            if not models:
                raise SSRLError("the server lists no models; pass model=")
            self._model = models[0].id
        return self._model

    async def health(self) -> bool:
        try:
            return (await self._http.get(self.base_url + "/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def chat(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        **options: Unpack[ChatOptions],
    ) -> ChatResult:
        body = build_chat_body(
            messages,
            model or await self.default_model(),
            **options,
        )
        return parse_chat_response(await self._json("POST", "/v1/chat/completions", json=body))

    async def stream(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        **options: Unpack[ChatOptions],
    ) -> AsyncIterator[StreamEvent]:
        body = build_chat_body(
            messages,
            model or await self.default_model(),
            stream=True,
            **options,
        )
        response = await self._send("POST", "/v1/chat/completions", json=body, stream=True)
        try:
            decoder = SSEDecoder()
            async for line in response.aiter_lines():
                payload = decoder.feed(line)
                if payload is not None:
                    for event in _events_of(payload):
                        yield event
                if decoder.done:
                    break
            else:
                payload = decoder.flush()
                if payload is not None:
                    for event in _events_of(payload):
                        yield event
        except httpx.HTTPError as exc:
            raise _connection_error(self.base_url, exc) from exc
        finally:
            await response.aclose()

    async def search(self, q: str, k: int = 5) -> SearchResult:
        return _search_result(await self._json("GET", "/v1/search", params={"q": q, "k": k}))

    async def retrieve(
        self, queries: str | Sequence[str], topk: int | None = None, *, return_scores: bool = False
    ) -> list[list[RetrievedDocument]]:
        body: dict[str, Any] = {"queries": [queries] if isinstance(queries, str) else list(queries)}
        if topk is not None:
            body["topk"] = topk
        if return_scores:
            body["return_scores"] = True
        return _retrieved(await self._json("POST", "/retrieve", json=body))
