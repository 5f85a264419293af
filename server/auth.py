"""Bearer-key auth for every route but the probes (`/health`, `/ready`, `/metrics`)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError

# The only paths a caller without a key reaches: liveness, readiness and the metrics scrape.
# Everything else needs a key when keys are configured: the OpenAI surface, the retriever
# routes, and vLLM's /tokenize, /detokenize and /version, which touch the tokenizer or say
# what runs (docs/security.md).
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


def needs_key(path: str) -> bool:
    return path not in PROBE_PATHS


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyChecker:
    """Compares a presented key against every configured key in constant time.

    Keys are compared as SHA-256 digests (equal length whatever the input), and every
    configured key is compared, so neither the length nor the position of a match leaks.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, presented: str | None) -> bool:
        candidate = _digest(presented or "")
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched and presented is not None


# Where AuthMiddleware leaves the SHA-256 digest of the accepted key, for the rate limiter.
KEY_DIGEST_SCOPE = "ssrl.key_digest"


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Bearer TOKEN`: the scheme in any case, any whitespace around both.

    The one parser of the header: auth and the rate limiter both use what it returns, so
    `bearer  KEY` and `BEARER KEY` are the same key to both.
    """
    if not authorization:
        return None
    parts = authorization.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1].strip():
        return None
    return parts[1].strip()


def request_token(scope: Scope) -> str | None:
    """The bearer token of an ASGI request's Authorization header, normalised."""
    for name, value in scope.get("headers") or ():
        if name.lower() == b"authorization":
            return bearer_token(value.decode("latin-1"))
    return None


def key_digest(key: str) -> bytes:
    return _digest(key)


class AuthMiddleware:
    """ASGI middleware: 401 in OpenAI's shape for a wrong or missing key."""

    def __init__(self, app: ASGIApp, checker: KeyChecker) -> None:
        self.app = app
        self.checker = checker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.checker.enabled
            and needs_key(scope["path"])
            and scope["method"] != "OPTIONS"
        ):
            token = request_token(scope)
            if not self.checker.accepts(token):
                message = (
                    "Incorrect API key provided."
                    if token
                    else "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                )
                error = APIError(
                    401,
                    message,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return
            # The limiter keys on the authenticated key, never on the header's spelling.
            scope[KEY_DIGEST_SCOPE] = _digest(token or "")
        await self.app(scope, receive, send)
