"""The shared HTTP layer of the remote search providers.

One ``HttpBackend`` owns one ``httpx.AsyncClient`` (connect/read timeouts, a connection
limit, no redirects followed) and turns every way a call can go wrong into one of the
``SearchError`` subclasses of ``router.search.base``:

* no usable answer (refused, reset, timed out, body cut short) -> ``SearchTransportError``
* a non-2xx status -> ``SearchHTTPError`` with the status and a parsed ``Retry-After``
* a 2xx body that is too large, not JSON, or not the documented shape -> ``SearchResponseError``

Keys never leak. Error messages are built from the backend name, the status and the class
name of the underlying error only: httpx's own messages and requests carry the URL (Google
puts its key in the query string) and are never formatted into a message nor chained as a
cause. httpx logs every request line, URL included, at INFO on the ``httpx`` logger; a filter
installed on that logger when this module is imported rewrites key-bearing query parameters
(``key=``, ``api_key=``, ``cx=``...) and URL userinfo to ``***`` before any handler sees them.

Retrying is left to the caller: ``SearchHTTPError.retryable`` and ``retry_after`` say whether
and when; a backend makes exactly one attempt per call.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from router.search.base import (
    Document,
    SearchError,
    SearchHTTPError,
    SearchResponseError,
    SearchTransportError,
)

logger = logging.getLogger(__name__)

# Wikimedia asks for a User-Agent naming the tool and a contact; the deployment knows its
# contact, so the `user_agent` option should be set there.
DEFAULT_USER_AGENT = "ssrl-search/0.1 (self-search inference server)"
# A model may paste a paragraph as its query; no provider wants more, and GET providers put it
# in the URL. Providers with a documented lower limit (Brave 400, Wikipedia 300) cut further.
MAX_QUERY_CHARS = 2_000
# Titles are shown to the model next to the text; a provider bug must not flood the prompt.
MAX_TITLE_CHARS = 300


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Transport limits of one backend; every field is settable per backend through options."""

    # Read timeout: the longest wait for any one chunk of the answer (httpx semantics).
    timeout: float = 10.0
    connect_timeout: float = 3.0
    max_connections: int = 10
    max_body_bytes: int = 2 * 1024 * 1024
    max_text_chars: int = 2_000
    user_agent: str = DEFAULT_USER_AGENT


# --------------------------------------------------------------------------------------------
# Log redaction


# Query parameters that carry credentials in some provider's API (Google `key`/`cx`, SerpAPI
# `api_key`), and the `user:password@` part of a URL.
_SECRET_PARAM_RE = re.compile(
    r"([?&](?:key|api_key|apikey|api-key|access_token|token|cx|auth|password)=)[^&#\s\"'>]*",
    re.IGNORECASE,
)
_USERINFO_RE = re.compile(r"(\w+://)[^/@\s\"']+@")


def redact_url_secrets(text: str) -> str:
    """``text`` with credential query values and URL userinfo replaced by ``***``."""
    return _USERINFO_RE.sub(r"\1***@", _SECRET_PARAM_RE.sub(r"\1***", text))


class RedactUrlSecrets(logging.Filter):
    """Rewrites a record whose message holds a URL credential. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (
            TypeError,
            ValueError,
        ):  # a malformed record: logging reports it, not us
            return True
        redacted = redact_url_secrets(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def install_log_redaction(logger_name: str = "httpx") -> None:
    """Attach ``RedactUrlSecrets`` to ``logger_name`` once.

    A logger's own filters run for every record it emits, before any handler, whatever the
    logging configuration; httpx emits its request lines on ``httpx`` itself (httpcore's
    loggers never include the URL). Lowering the ``httpx`` logger to WARNING instead would
    hide every other client's request lines from operators too.
    """
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactUrlSecrets) for f in target.filters):
        target.addFilter(RedactUrlSecrets())


install_log_redaction()


# --------------------------------------------------------------------------------------------
# Small helpers shared by the providers


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # NaN and negatives are nonsense; treat them as "the provider did not say".
        return seconds if seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means the same
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_RE = re.compile(r"\s+")


def strip_html(text: str) -> str:
    """Plain text from a provider's HTML-highlighted snippet: tags dropped, entities decoded."""
    return _SPACE_RE.sub(" ", html.unescape(_TAG_RE.sub("", text))).strip()


def rank_score(rank: int) -> float:
    """A score for providers that only rank: 1.0, 0.5, 0.33... for ranks 0, 1, 2..."""
    return 1.0 / (rank + 1)


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters (stripped first)."""
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip()


def cut_query(query: str, limit: int = MAX_QUERY_CHARS) -> str:
    return query.strip()[:limit].strip()


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def shape_error(backend: str, what: str) -> SearchResponseError:
    """A ``SearchResponseError`` for an answer that is not the provider's documented shape."""
    return SearchResponseError(f"{backend}: unexpected answer: {what}")


def expect_dict(value: Any, backend: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise shape_error(backend, f"{what} is not an object")
    return value


def expect_list(value: Any, backend: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise shape_error(backend, f"{what} is not a list")
    return value


def opt_str(item: Mapping[str, Any], key: str) -> str:
    """A string field that providers sometimes omit or null: "" then; other types too."""
    value = item.get(key)
    return value if isinstance(value, str) else ""


def opt_float(item: Mapping[str, Any], key: str) -> float | None:
    value = item.get(key)
    # bool is an int subclass; a provider's `true` is not a score. NaN is not one either.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def require_items(raw: list[Any], docs: list[Any], backend: str) -> None:
    """Items were returned but none had the fields we need: the shape changed; say so."""
    if raw and not docs:
        raise shape_error(backend, "no result has the expected fields")


_STATUS_HINTS = {
    401: "the API key was rejected",
    402: "payment required (credits exhausted?)",
    403: "forbidden",
    404: "not found (check base_url)",
    429: "rate limited",
}


@functools.cache
def _shared_ssl_context() -> ssl.SSLContext:
    # Building a context loads the CA bundle (~15 ms); every backend can share one, as httpx's
    # own default would be identical (it honours SSL_CERT_FILE / SSL_CERT_DIR the same way).
    return httpx.create_ssl_context()


def normalize_base_url(base_url: str) -> str:
    try:
        url = httpx.URL(base_url.strip())
    except (httpx.InvalidURL, TypeError):
        raise ValueError("base_url is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("base_url must be an http:// or https:// URL with a host")
    return str(url).rstrip("/")


# --------------------------------------------------------------------------------------------
# The base class


class HttpBackend:
    """Base of the HTTP providers: owns the client, performs one call, maps its failures.

    Subclasses implement ``search`` with ``request_json``. Credentials are passed as
    ``headers`` (kept on the client) or as ``params`` per call; neither is ever shown by
    ``repr`` nor put into an error message. Use one instance from one event loop.
    """

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        settings: HttpSettings | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.base_url = normalize_base_url(base_url)
        self.settings = settings or HttpSettings()
        s = self.settings
        self._client = httpx.AsyncClient(
            headers={
                "User-Agent": s.user_agent,
                "Accept": "application/json",
                **(headers or {}),
            },
            timeout=httpx.Timeout(s.timeout, connect=s.connect_timeout),
            limits=httpx.Limits(
                max_connections=s.max_connections,
                max_keepalive_connections=s.max_connections,
            ),
            # A redirect would resend custom key headers (X-API-KEY...) to wherever it points;
            # httpx strips only Authorization. A moved API is a configuration error to fix.
            follow_redirects=False,
            verify=_shared_ssl_context(),
        )
        self._closed = False

    def __repr__(self) -> str:
        # base_url may hold userinfo (a SearXNG behind basic auth); keys are never attributes
        # shown here.
        shown = redact_url_secrets(self.base_url)
        return f"{type(self).__name__}(name={self.name!r}, base_url={shown!r})"

    async def aclose(self) -> None:
        self._closed = True
        await self._client.aclose()

    def status_hint(self, status: int) -> str | None:
        """A short, key-free explanation of an error status; subclasses add their own."""
        if 300 <= status < 400:
            return "redirect not followed (set base_url to the final address)"
        return _STATUS_HINTS.get(status)

    def retry_after(self, headers: httpx.Headers) -> float | None:
        """Seconds the provider asked us to wait; subclasses read provider-specific headers."""
        return parse_retry_after(headers.get("retry-after"))

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json_body: Any = None,
        base_url: str | None = None,
    ) -> Any:
        """One call to ``{base_url}{path}``; its parsed JSON answer, or a ``SearchError``."""
        if self._closed:
            raise SearchError(f"{self.name}: backend is closed")
        url = (base_url or self.base_url) + path
        failure: SearchError
        try:
            return await self._request(method, url, params, json_body)
        except httpx.TimeoutException as exc:
            failure = SearchTransportError(f"{self.name}: timed out ({type(exc).__name__})")
        except httpx.DecodingError as exc:  # a broken gzip/brotli body: it did arrive
            failure = SearchResponseError(f"{self.name}: undecodable body ({type(exc).__name__})")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            failure = SearchTransportError(f"{self.name}: transport error ({type(exc).__name__})")
        # Raised outside the `except` blocks on purpose: the httpx exception (whose message
        # and `.request` carry the URL) must not ride along as __context__ into tracebacks.
        raise failure

    async def request_object(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json_body: Any = None,
        base_url: str | None = None,
    ) -> dict[str, Any]:
        """`request_json` for the providers whose answer is a JSON object (all of them)."""
        answer = await self.request_json(method, path, params=params, json_body=json_body, base_url=base_url)
        return expect_dict(answer, self.name, "the answer")

    async def _request(
        self,
        method: str,
        url: str,
        params: Mapping[str, str | int] | None,
        json_body: Any,
    ) -> Any:
        cap = self.settings.max_body_bytes
        async with self._client.stream(method, url, params=params, json=json_body) as response:
            status = response.status_code
            if not response.is_success:
                hint = self.status_hint(status)
                raise SearchHTTPError(
                    f"{self.name}: HTTP {status}" + (f" ({hint})" if hint else ""),
                    status,
                    self.retry_after(response.headers),
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise SearchResponseError(f"{self.name}: answer larger than {cap} bytes")
            chunks: list[bytes] = []
            size = 0
            # Read by chunks and stop at the cap: a runaway body never sits whole in memory.
            # aiter_bytes yields decoded bytes, so the cap also bounds a compressed bomb.
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise SearchResponseError(f"{self.name}: answer larger than {cap} bytes")
                chunks.append(chunk)
            content_type = response.headers.get("content-type", "")
        logger.debug("%s: HTTP %d, %d bytes", self.name, status, size)
        return self._parse_json(b"".join(chunks), content_type)

    def _parse_json(self, body: bytes, content_type: str) -> Any:
        try:
            return json.loads(body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both
            pass
        media = content_type.split(";")[0].strip().lower()[:60] or "no content type"
        if media == "text/html" or body.lstrip()[:1] == b"<":
            # A proxy, captive portal or provider outage page answered in its place.
            raise SearchResponseError(f"{self.name}: got an HTML page instead of JSON ({media})")
        raise SearchResponseError(f"{self.name}: answer is not valid JSON ({media})")

    def document(
        self,
        *,
        title: str,
        text: str,
        url: str | None,
        score: float | None,
        rank: int,
        doc_id: str | None = None,
    ) -> Document:
        """A ``Document`` from this backend: text cut to the limit, a rank score if none given."""
        return Document(
            title=clip(title, MAX_TITLE_CHARS),
            text=clip(text, self.settings.max_text_chars),
            url=url or None,
            score=score if score is not None else rank_score(rank),
            source=self.name,
            id=doc_id,
        )
