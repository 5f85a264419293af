"""Bearer-key auth for the API routes; `/health` and `/metrics` stay open."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError

# Paths that need a key: the OpenAI surface and the retriever routes.
PROTECTED_PREFIXES = ("/v1", "/retrieve")


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


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class AuthMiddleware:
    """ASGI middleware: 401 in OpenAI's shape for a wrong or missing key."""

    def __init__(self, app: ASGIApp, checker: KeyChecker) -> None:
        self.app = app
        self.checker = checker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.checker.enabled
            and scope["path"].startswith(PROTECTED_PREFIXES)
            and scope["method"] != "OPTIONS"
        ):
            headers = dict(scope["headers"])
            raw = headers.get(b"authorization")
            token = bearer_token(raw.decode("latin-1") if raw else None)
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
        await self.app(scope, receive, send)
