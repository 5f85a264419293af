"""A cap on request body size, enforced while the body is read (413 past it)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError


class BodySizeLimitMiddleware:
    """Rejects a body over `max_bytes`, by its Content-Length or by counting the chunks.

    Counting matters because a chunked upload has no Content-Length to trust. Past the
    limit the receive channel raises an HTTPException(413), which FastAPI lets through its
    body parsing and the error handlers turn into OpenAI's shape.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"Request body too large: the limit is {self.max_bytes} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            error = APIError(413, self._message(), code="request_too_large")
            await error.response()(scope, receive, send)
            return

        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)
