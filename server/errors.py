"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.engine.base import EngineDeadError, EngineRequestError, PromptTooLongError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


def encodable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates) written as escapes.

    Error messages may quote what a client sent; a lone surrogate in it would make the
    answer itself unencodable (a 500, and a closed connection).
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error the API answers with; raise it anywhere in a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = encodable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else encodable(param)
        # Every error names a string code (OpenAI's clients switch on it), from its status
        # where the raiser gave none.
        self.code = code if code is not None else default_code(status, message)
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


UNEXPECTED = "The server had an error while processing your request."

# A string code for an error that came without one (vLLM's layer sends its HTTP status as the
# code), by status; a 400 about the context says so.
_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_value",
    429: "rate_limit_exceeded",
    500: "server_error",
    501: "not_implemented",
    503: "engine_unavailable",
}


# A step pydantic adds to an error's location for a wrapping validator, which vLLM's layer
# leaves in its `param` (`response_format.function-wrap[__log_extra_fields__()].type`).
_VALIDATOR_STEP = re.compile(r"\.?function-(?:wrap|after|before|plain)\[[^\]]*\](?=\.|$)")


def default_code(status: int, message: str) -> str | None:
    """The string code of an error that came without one."""
    return "context_length_exceeded" if "maximum context length" in message else _CODES.get(status)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def openai_error_payload(status: int, payload: Any) -> dict[str, Any]:
    """Any JSON error body in OpenAI's shape, as ssrl's own routes answer: `type` from the
    status (`invalid_request_error`, not vLLM's `BadRequestError`), a string `code` (not
    vLLM's numeric status), the message and param kept. FastAPI's `{"detail": ...}` too."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        detail = payload.get("detail") if isinstance(payload, dict) else None
        text = detail if isinstance(detail, str) else json.dumps(detail if detail is not None else payload)
        error = {"message": text}
    said = error.get("message")
    message = said if isinstance(said, str) and said else _phrase(status)
    given = error.get("code")
    code = given if isinstance(given, str) else default_code(status, message)
    param = error.get("param")
    if isinstance(param, str):
        param = _VALIDATOR_STEP.sub("", param) or None
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param if isinstance(param, str) else None,
            "code": code,
        }
    }


def api_error_of(exc: BaseException) -> APIError:
    """THE mapping of an error to its HTTP answer: every route, streamed or not, uses it."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineRequestError):
        # The engine's message and param; the type and a string code as every route sends them.
        code = exc.code or default_code(exc.status, exc.message)
        return APIError(exc.status, exc.message, param=exc.param, code=code)
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine is not available.", code="engine_unavailable")
    return APIError(500, UNEXPECTED)


def error_event(exc: BaseException, what: str) -> dict[str, Any]:
    """The error event that ends a stream; call it in the `except` block (an unexpected
    error's trace is logged for operators, never sent)."""
    error = api_error_of(exc)
    if error.status >= 500 and not isinstance(exc, (APIError, EngineDeadError)):
        logger.exception("error while streaming %s", what)
    return error.body()


def error_json(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return APIError(status, message, **kwargs).response()


def _is_union_branch(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def param_of(loc: Iterable[Any]) -> str | None:
    """The request field a pydantic error location names: without the body/query prefix and
    without the names pydantic gives union branches and wrapping validators (`str`,
    `function-wrap[__log_extra_fields__()]`), which are no parameters."""
    return (
        ".".join(str(part) for part in loc if part not in ("body", "query") and not _is_union_branch(part))
        or None
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """One readable sentence from pydantic's error list, the field it names, and a code."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None, None
    # The error a validator of ours raised says more than "not a list" from another branch
    # of a union; the union's branch names (`str`, `list[ContentPart]`) are no parameters.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    param = param_of(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request.", None, "invalid_json"
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    msg = first.get("msg", "Invalid value")
    where = f" for '{param}'" if param else ""
    return f"Invalid value{where}: {msg}.", param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def _engine_error(_: Request, exc: Exception) -> JSONResponse:
        return api_error_of(exc).response()

    for engine_error in (EngineRequestError, PromptTooLongError, EngineDeadError):
        app.add_exception_handler(engine_error, _engine_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_json(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "Error"
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_json(exc.status_code, detail or phrase, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Log the trace for operators; never send it to the client.
        logger.exception("unhandled error: %s", exc)
        return error_json(500, UNEXPECTED)
