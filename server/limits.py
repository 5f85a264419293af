"""Request limits: head size (431 past it), body size (413 past it) and a per-key request
rate (429 past it; shared between replicas through Redis with --redis-url)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

from cachetools import LRUCache
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import KEY_DIGEST_SCOPE, needs_key
from server.errors import APIError
from server.key_overrides import KeyOverrides
from server.shared_state import SharedState, SharedStateUnavailable
from server.token_bucket import RateLimit, take


class BodySizeLimitMiddleware:
    """Rejects a body over `max_bytes`, by its Content-Length or by counting the chunks.

    Counting matters because a chunked upload has no Content-Length to trust. Past the
    limit the receive channel raises an HTTPException(413), which FastAPI lets through its
    body parsing and the error handlers turn into OpenAI's shape.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, path_limit: Callable[[str], int | None] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # A tighter limit for some paths (the tokenizer routes), or None for the global one.
        self.path_limit = path_limit

    def limit_for(self, path: str) -> int:
        own = self.path_limit(path) if self.path_limit is not None else None
        return self.max_bytes if own is None else min(own, self.max_bytes)

    @staticmethod
    def _message(limit: int) -> str:
        return f"Request body too large: the limit is {limit} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            error = APIError(413, self._message(limit), code="request_too_large")
            await error.response()(scope, receive, send)
            return

        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, self._message(limit))
            return message

        await self.app(scope, counting_receive, send)


class HeaderSizeLimitMiddleware:
    """Rejects a request whose head (request line and headers) is over `max_bytes` with 431.

    The exact bound, whatever HTTP implementation serves the app: uvicorn's h11 only bounds
    what it buffers of an unfinished head (`h11_max_incomplete_event_size`, and never less than
    one socket read), and httptools bounds nothing.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = (
                len(scope.get("method", ""))
                + len(scope.get("raw_path") or b"")
                + len(scope.get("query_string", b""))
                + sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            )
            if size > self.max_bytes:
                error = APIError(
                    431,
                    f"Request header fields too large: the limit is {self.max_bytes} bytes.",
                    code="request_header_too_large",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def client_identity(scope: Scope) -> bytes:
    """Who a request counts against: the authenticated key as AuthMiddleware parsed it (a
    digest), so `bearer  KEY` and `BEARER KEY` are one client. Without keys configured, a
    presented token proves nothing (any string passes), so the client address is the key."""
    digest = scope.get(KEY_DIGEST_SCOPE)
    if isinstance(digest, bytes):
        return digest
    client = scope.get("client") or ("?", 0)
    return hashlib.sha256(str(client[0]).encode()).digest()


class RateLimitMiddleware:
    """A token bucket per authenticated API key (per client address when there are no keys).

    Runs inside AuthMiddleware, which leaves the accepted key's digest in the scope.
    Buckets are keyed by a digest of the key, never the key itself. With `shared` (Redis,
    --redis-url) every replica drains the same bucket; without it, or while Redis is out,
    each process keeps its own, in an LRU of bounded size so that a flood of distinct keys
    cannot grow memory without bound. `overrides` (--keys-file) give a key its own rate.
    """

    def __init__(
        self,
        app: ASGIApp,
        per_minute: float | None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
        overrides: KeyOverrides | None = None,
        shared: SharedState | None = None,
    ) -> None:
        self.app = app
        self.default = RateLimit.of(per_minute, burst) if per_minute is not None else None
        self.clock = clock
        self.overrides = overrides or KeyOverrides()
        self.shared = shared
        self.buckets: LRUCache[bytes, tuple[float, float]] = LRUCache(maxsize=max_clients)

    def limit_for(self, client: bytes) -> RateLimit | None:
        default = self.default.per_minute if self.default is not None else None
        per_minute = self.overrides.get(client).rate_limit_or(default)
        if per_minute is None:
            return None
        if self.default is not None and per_minute == self.default.per_minute:
            return self.default
        return RateLimit.of(per_minute)

    def _take(self, client: bytes, limit: RateLimit) -> float:
        """This process's bucket: 0 when a token was taken, else the seconds until one is."""
        now = self.clock()
        tokens, updated = self.buckets.get(client, (None, now))
        left, wait = take(tokens, updated, now, limit)
        self.buckets[client] = (left, now)
        return wait

    async def _admit(self, client: bytes) -> float:
        limit = self.limit_for(client)
        if limit is None:
            return 0.0
        if self.shared is not None:
            try:
                return await self.shared.take_token(client, limit)
            except SharedStateUnavailable:
                pass  # fail open to this replica's own bucket (never to no limit)
        return self._take(client, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and needs_key(scope["path"]):
            wait = await self._admit(client_identity(scope))
            if wait > 0:
                error = APIError(
                    429,
                    "Rate limit reached for this API key; retry after the indicated time.",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(math.ceil(wait))},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# Routes that only run the tokenizer: a body there is one prompt (or its token ids), so it
# gets a bound from the context instead of --max-request-bytes. 8 bytes per token of context
# is twice what ordinary text takes (about 4) once JSON-escaped; 64 KiB at the least.
TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize"})
TOKENIZER_BYTES_PER_TOKEN = 8
TOKENIZER_MIN_BODY_BYTES = 64 * 1024


def tokenizer_body_limit(max_model_len: int) -> int:
    """The body limit of /tokenize and /detokenize for a context of `max_model_len` tokens."""
    return max(TOKENIZER_MIN_BODY_BYTES, TOKENIZER_BYTES_PER_TOKEN * max_model_len)
