"""OpenAI's response and error shapes on every path (issue 35): what agent libraries switch
on. In process, on the scripted engine; the libraries themselves run in tests/e2e/test_agents.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi.responses import JSONResponse

from server.errors import APIError, openai_error_payload
from server.protocol import AssistantMessage
from server.vllm_serving import openai_errors
from tests.unit.test_http_layer import CHAT, chat, post
from tests.unit.test_parity_dispatch import engine, error_of


def test_a_message_that_only_calls_tools_says_content_null() -> None:
    message = AssistantMessage(tool_calls=[{"id": "c", "type": "function", "function": {"name": "f"}}])
    assert message.model_dump(exclude_none=True)["content"] is None


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (
            400,
            {"error": {"message": "bad", "type": "BadRequestError", "param": "temperature", "code": 400}},
            {
                "message": "bad",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_value",
            },
        ),
        (
            400,
            {
                "error": {
                    "message": "x",
                    "param": "response_format.function-wrap[__log_extra_fields__()].type",
                }
            },
            {
                "message": "x",
                "type": "invalid_request_error",
                "param": "response_format.type",
                "code": "invalid_value",
            },
        ),
        (
            400,
            {"error": {"message": "This model's maximum context length is 2048 tokens.", "code": 400}},
            {
                "message": "This model's maximum context length is 2048 tokens.",
                "type": "invalid_request_error",
                "param": None,
                "code": "context_length_exceeded",
            },
        ),
        (
            404,
            {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}},
            {
                "message": "The model `x` does not exist.",
                "type": "not_found_error",
                "param": None,
                "code": "not_found",
            },
        ),
        (
            400,
            {"detail": "There was an error parsing the body"},
            {
                "message": "There was an error parsing the body",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_value",
            },
        ),
    ],
)
def test_vllm_s_error_bodies_get_openai_s_shape(status: int, payload: Any, expected: dict[str, Any]) -> None:
    assert openai_error_payload(status, payload) == {"error": expected}


def test_forwarded_error_answers_are_rewritten_and_the_rest_pass() -> None:
    async def main() -> list[list[dict[str, Any]]]:
        sent: list[list[dict[str, Any]]] = []
        for response in (
            JSONResponse(
                {"error": {"message": "bad", "type": "BadRequestError", "code": 400}}, status_code=400
            ),
            JSONResponse({"ok": True}),
        ):
            messages: list[dict[str, Any]] = []

            async def send(message: Any, into: list[dict[str, Any]] = messages) -> None:
                into.append(dict(message))

            async def receive() -> Any:
                return {"type": "http.disconnect"}

            await response({"type": "http"}, receive, openai_errors(send))
            sent.append(messages)
        return sent

    import asyncio

    error, ok = asyncio.run(main())
    body = json.loads(error[1]["body"])
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_value"
    assert dict(error[0]["headers"])[b"content-length"] == str(len(error[1]["body"])).encode()
    assert json.loads(ok[1]["body"]) == {"ok": True}


def test_every_error_names_a_string_code() -> None:
    assert APIError(400, "x").code == "invalid_value"
    assert APIError(404, "x").code == "not_found"
    assert APIError(400, "x", code="mine").code == "mine"


def test_the_self_search_logprobs_refusal_has_a_code() -> None:
    response = post(engine(), CHAT, chat(logprobs=True), self_search=True, search="none")
    error = error_of(response, 400)
    assert (error["param"], error["code"]) == ("logprobs", "unsupported_parameter")


def test_validation_params_name_the_field_not_the_validator() -> None:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(CHAT, json=chat(response_format={"type": "nonsense"}))

    from tests.unit.test_http_layer import drive

    for self_search in (True, False):
        response = drive(engine(), body, self_search=self_search, search="none")
        error = error_of(response, 400)
        assert error["param"] is not None and error["param"].startswith("response_format"), error
        assert "function-" not in error["param"], error


@pytest.mark.parametrize(
    ("loop_finish", "calls", "expected"),
    [
        # A whole parsed call is a tool call even when the budget ran out right after it.
        (
            "length",
            [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            "tool_calls",
        ),
        (
            "stop",
            [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            "tool_calls",
        ),
        ("length", None, "length"),
        ("stop", None, "stop"),
    ],
)
def test_finish_reason_is_the_answer_s_own(loop_finish: str, calls: Any, expected: str) -> None:
    from router.loop import LoopResult
    from server.composition import ShapedAnswer
    from server.serving_self_search import ChoiceResult, SelfSearchChat

    result = LoopResult("x", True, "", [], 1, 1, loop_finish)
    choice = ChoiceResult(result, [result])
    assert SelfSearchChat._finish_reason(choice, ShapedAnswer(None, calls)) == expected


def test_a_stream_s_error_event_gets_openai_s_shape_too() -> None:
    from server.vllm_serving import openai_error_events

    chunk = b'data: {"error": {"message": "bad", "type": "BadRequestError", "param": null, "code": 400}}\n\n'
    line = openai_error_events(chunk).split(b"\n")[0]
    error = json.loads(line[len(b"data: ") :])["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_value")
    ordinary = b'data: {"choices": [{"delta": {"content": "\\"error\\""}}]}\n\n'
    assert openai_error_events(ordinary) == ordinary
