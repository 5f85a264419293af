"""Reading a request body as JSON before any route does: the errors a parser can raise that
are the client's fault become 400s in OpenAI's shape, never a 500 with a trace."""

from __future__ import annotations

import json
from typing import Any

from server.errors import APIError


class NotJSON:
    """The body is not JSON: the route that answers it reports that in its own words."""


NOT_JSON = NotJSON()


def parse_json_body(body: bytes) -> Any:
    """The body's JSON value, NOT_JSON when it does not parse, or a 400 when parsing it
    cannot even start or finish: bytes that are not UTF-8, or nesting so deep that Python's
    parser runs out of stack (a RecursionError, which would otherwise be a 500)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400,
            f"The request body is not valid UTF-8 (byte {exc.start}).",
            code="invalid_json",
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise APIError(400, "The JSON body is nested too deeply.", code="invalid_json") from None
    except ValueError:
        return NOT_JSON


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The body when it is a JSON object, else None (the 400s of parse_json_body apply)."""
    parsed = parse_json_body(body) if body else None
    return parsed if isinstance(parsed, dict) else None
