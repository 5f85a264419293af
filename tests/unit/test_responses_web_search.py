"""OpenAI's Responses `web_search` tool as ssrl's self-search: the pure conversions
(server/serving_responses.py), then the route in process on a scripted engine.

Every answer is parsed with the installed `openai` SDK's `Response.model_validate`, so the
shape is the one OpenAI's clients read.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from router.prompts import GUIDED_DOCS_PER_SEARCH
from router.search.service import SearchService
from server.errors import APIError
from server.protocol import AssistantMessage, ChatChoice, ChatCompletionResponse, Usage
from server.serving_responses import (
    ConvertedRequest,
    output_annotations,
    search_items,
    sse_stream,
    stream_events,
    to_chat_request,
    to_response,
    web_search_tool_index,
)
from server.serving_self_search import SelfSearchRuntime, loop_config
from server.settings import ServeSettings
from tests.scripted_engine import ScriptedEngine
from tests.unit.test_self_search_http import (
    DOCS,
    INFO,
    MODEL,
    FakeBackend,
    Responder,
    assert_error,
    run_app,
)

WEB = {"type": "web_search"}
FUNCTION = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def request(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "Who wrote Hamlet?", "tools": [WEB], **fields}


def refused(body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as info:
        to_chat_request(body, MODEL)
    assert info.value.status == 400
    return info.value


# ----- which requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "index"),
    [
        (request(), 0),
        (request(tools=[{"type": "web_search_preview"}]), 0),
        (request(tools=[FUNCTION, {"type": "web_search_2025_08_26"}]), 1),
        (request(tools=[FUNCTION]), None),
        (request(tools=[]), None),
        ({"model": MODEL, "input": "hi"}, None),
        (request(tools="web_search"), None),
        ([1, 2], None),
        (None, None),
    ],
)
def test_web_search_tool_index(body: Any, index: int | None) -> None:
    assert web_search_tool_index(body) == index


# ----- the request --------------------------------------------------------------------------


def test_a_string_input_is_one_user_message_with_the_server_defaults() -> None:
    converted = to_chat_request(request(), MODEL)
    chat = converted.chat
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == [
        {"role": "user", "content": "Who wrote Hamlet?"}
    ]
    assert chat.model == MODEL and chat.n == 1 and not chat.stream
    assert chat.max_tokens is None and chat.temperature is None and chat.top_p is None
    assert chat.self_search is not None
    assert chat.self_search.model_dump(exclude_none=True) == {"enabled": True}
    fields = chat.model_dump(exclude_none=True)
    assert "tools" not in fields and "tool_choice" not in fields and "response_format" not in fields


def test_model_defaults_to_the_served_one() -> None:
    body = request()
    del body["model"]
    assert to_chat_request(body, "served").chat.model == "served"


def test_items_instructions_and_sampling_fields() -> None:
    body = request(
        instructions="Be brief.",
        input=[
            {"role": "system", "content": "Answer in English."},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Dev."}]},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Who wrote "},
                    {"type": "input_text", "text": "Hamlet?"},
                ],
            },
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Shakespeare.", "annotations": []}],
            },
            {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "user", "content": "And Macbeth?"},
        ],
        max_output_tokens=64,
        temperature=0.5,
        top_p=0.9,
        user="u-1",
        store=True,
        metadata={"k": "v"},
        stream=False,
        include=[],
        truncation="disabled",
        background=False,
        reasoning=None,
        text={"format": {"type": "text"}},
        self_search={"max_turns": 1, "policy": "threshold"},
    )
    converted = to_chat_request(body, MODEL)
    chat = converted.chat
    assert [(m.role, m.text()) for m in chat.messages] == [
        ("system", "Be brief."),
        ("system", "Answer in English."),
        ("developer", "Dev."),
        ("user", "Who wrote Hamlet?"),
        ("assistant", "Shakespeare."),
        ("user", "And Macbeth?"),
    ]
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.user) == (64, 0.5, 0.9, "u-1")
    assert chat.self_search is not None
    assert chat.self_search.model_dump(exclude_none=True) == {
        "enabled": True,
        "max_turns": 1,
        "policy": "threshold",
    }
    assert converted.echo["metadata"] == {"k": "v"}
    assert converted.echo["instructions"] == "Be brief."


def docs_per_search(chat: Any) -> int:
    """Documents per search the loop runs this chat request with (guided, server defaults)."""
    runtime = SelfSearchRuntime(ServeSettings(), SearchService([]), {}, "guided")
    return loop_config(runtime, chat, 256)[0].docs_per_search


@pytest.mark.parametrize(
    ("size", "docs"),
    [("low", 1), ("medium", GUIDED_DOCS_PER_SEARCH), ("high", 5), (None, GUIDED_DOCS_PER_SEARCH)],
)
def test_search_context_size(size: str | None, docs: int) -> None:
    chat = to_chat_request(request(tools=[{"type": "web_search", "search_context_size": size}]), MODEL).chat
    # The size travels under chat's own name, which sets the documents per search.
    assert (chat.web_search_options is not None) is (size is not None)
    assert chat.self_search is not None and chat.self_search.docs_per_search is None
    assert docs_per_search(chat) == docs


def test_an_explicit_docs_per_search_wins_over_the_context_size() -> None:
    body = request(
        tools=[{"type": "web_search", "search_context_size": "low"}], self_search={"docs_per_search": 2}
    )
    chat = to_chat_request(body, MODEL).chat
    assert chat.self_search is not None and chat.self_search.docs_per_search == 2
    assert docs_per_search(chat) == 2


@pytest.mark.parametrize(
    ("choice", "policy"),
    [("auto", None), ("none", "never"), ("required", "always"), ({"type": "web_search_preview"}, "always")],
)
def test_tool_choice_with_web_search_alone_sets_the_policy(choice: Any, policy: str | None) -> None:
    chat = to_chat_request(request(tool_choice=choice), MODEL).chat
    assert chat.self_search is not None and chat.self_search.policy == policy
    assert "tool_choice" not in chat.model_dump(exclude_none=True)


def test_a_forced_policy_conflicting_with_self_search_policy_is_refused() -> None:
    error = refused(request(tool_choice="none", self_search={"policy": "always"}))
    assert error.param == "tool_choice"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [{"type": "web_search", "user_location": {"type": "approximate", "city": "Paris"}}]},
            "tools[0].user_location",
        ),
        ({"tools": [{"type": "web_search", "filters": {"allowed_domains": ["a.org"]}}]}, "tools[0].filters"),
        (
            {"tools": [{"type": "web_search_preview", "search_content_types": ["image"]}]},
            "tools[0].search_content_types",
        ),
        ({"tools": [WEB, {"type": "file_search", "vector_store_ids": []}]}, "tools[1].type"),
        ({"tools": [WEB, WEB]}, "tools[1]"),
        ({"tools": [WEB, {"type": ["function"]}]}, "tools[1].type"),
        ({"tools": [{"type": "web_search", "search_context_size": ["low"]}]}, "tools[0].search_context_size"),
        ({"tool_choice": {"type": {}}}, "tool_choice.type"),
        ({"tools": [{"type": "web_search", "search_context_size": "huge"}]}, "tools[0].search_context_size"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"stream_options": {"include_obfuscation": True}, "stream": True}, "stream_options"),
        ({"stream_options": {}}, "stream_options"),
        ({"background": True}, "background"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"top_k": 5}, "top_k"),
        ({"text": {"format": {"type": "text"}, "verbosity": "low"}}, "text.verbosity"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": []}, "input"),
        ({"input": 3}, "input"),
        ({"self_search": {"enabled": False}}, "self_search.enabled"),
        ({"self_search": {"policy": "nonsense"}}, "self_search.policy"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_what_the_loop_cannot_honour_is_a_400_naming_it(fields: dict[str, Any], param: str) -> None:
    error = refused(request(**fields))
    assert error.param == param
    assert error.message


def test_unsupported_fields_answer_unsupported_parameter() -> None:
    assert refused(request(previous_response_id="resp_1")).code == "unsupported_parameter"
    assert (
        refused(request(tools=[{"type": "web_search", "user_location": {"city": "x"}}])).code
        == "unsupported_parameter"
    )


def test_null_fields_are_unset() -> None:
    body = request(previous_response_id=None, reasoning=None, include=None, tool_choice=None)
    body["tools"] = [{"type": "web_search", "user_location": None, "filters": None}]
    assert to_chat_request(body, MODEL).chat.self_search is not None


def test_function_tools_history_and_formats_become_chat_fields() -> None:
    body = request(
        tools=[WEB, FUNCTION],
        tool_choice={"type": "function", "name": "get_weather"},
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {
                "type": "function_call",
                "call_id": "call_2",
                "name": "get_weather",
                "arguments": '{"city":"Rome"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [{"type": "input_text", "text": "rain"}],
            },
        ],
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
    )
    chat = to_chat_request(body, MODEL).chat
    extra = chat.model_dump(exclude_none=True)
    assert extra["tools"] == [
        {
            "type": "function",
            "function": {k: FUNCTION[k] for k in ("name", "description", "parameters", "strict")},
        }
    ]
    assert extra["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert extra["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
    }
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert messages[1] == {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
            },
        ],
    }
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]


@pytest.mark.parametrize(
    ("choice", "chat_choice", "policy"),
    [
        (None, "auto", None),
        ("auto", "auto", None),
        ("required", "required", None),
        ("none", "none", "never"),
        ({"type": "web_search_preview"}, "auto", "always"),
    ],
)
def test_tool_choice_with_function_tools(choice: Any, chat_choice: Any, policy: str | None) -> None:
    chat = to_chat_request(request(tools=[WEB, FUNCTION], tool_choice=choice), MODEL).chat
    assert chat.model_dump(exclude_none=True)["tool_choice"] == chat_choice
    assert chat.self_search is not None and chat.self_search.policy == policy


# ----- the answer ---------------------------------------------------------------------------


def search(
    decision: str, query: str, fallback: str | None = None, urls: tuple[str | None, ...] = ()
) -> dict[str, Any]:
    return {
        "query": query,
        "decision": decision,
        "fallback": fallback,
        "documents": [{"title": "t", "url": u, "snippet": "s"} for u in urls],
        "information": f"info about {query}",
    }


def test_search_items_in_trace_order() -> None:
    trace = {
        "searches": [
            search("external", "q1", urls=("https://a.org", None, "https://b.org", "https://a.org")),
            search("internal", "q2"),
            search("external", "q3", fallback="search timed out"),
            search("skipped", ""),
        ]
    }
    items = search_items(trace)
    assert [i["type"] for i in items] == ["web_search_call", "reasoning", "reasoning"]
    web = items[0]
    assert web["id"].startswith("ws_") and web["status"] == "completed"
    assert web["action"] == {
        "type": "search",
        "query": "q1",
        "sources": [{"type": "url", "url": "https://a.org"}, {"type": "url", "url": "https://b.org"}],
    }
    assert items[1]["id"].startswith("rs_")
    assert items[1]["summary"] == [{"type": "summary_text", "text": "Self-filled search: q2"}]
    assert items[1]["content"] == [{"type": "reasoning_text", "text": "info about q2"}]
    assert items[2]["summary"][0]["text"] == "Self-filled search: q3"


def test_output_annotations_are_flat_url_citations() -> None:
    chat_shape = [
        {
            "type": "url_citation",
            "url_citation": {"url": "https://a.org", "title": "A", "start_index": 0, "end_index": 5},
        }
    ]
    assert output_annotations(chat_shape) == [
        {"type": "url_citation", "url": "https://a.org", "title": "A", "start_index": 0, "end_index": 5}
    ]
    assert output_annotations(None) == []


def chat_result(
    answer: str = "Shakespeare",
    finish_reason: str = "stop",
    trace: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> ChatCompletionResponse:
    trace = trace or {"searches": [search("external", "Hamlet author", urls=("https://a.org",))]}
    annotations = [
        {
            "type": "url_citation",
            "url_citation": {
                "url": "https://a.org",
                "title": "A",
                "start_index": 0,
                "end_index": len(answer),
            },
        }
    ]
    extra = {"tool_calls": tool_calls} if tool_calls else {}
    message = AssistantMessage(content=answer, reasoning="...", annotations=annotations, **extra)
    choice = ChatChoice(index=0, message=message, finish_reason=finish_reason, self_search=trace)
    return ChatCompletionResponse(model=MODEL, choices=[choice], usage=Usage.of(10, 4))


def converted(**fields: Any) -> ConvertedRequest:
    return to_chat_request(request(**fields), MODEL)


def test_a_completed_answer_parses_as_an_openai_response() -> None:
    body = to_response(chat_result(), converted(metadata={"k": "v"}, temperature=0.2))
    parsed = Response.model_validate(body)
    assert parsed.object == "response" and parsed.id.startswith("resp_")
    assert parsed.status == "completed" and parsed.incomplete_details is None
    assert parsed.model == MODEL
    assert parsed.output_text == "Shakespeare"
    assert [i.type for i in parsed.output] == ["web_search_call", "message"]
    message = body["output"][1]
    assert message["id"].startswith("msg_") and message["role"] == "assistant"
    assert message["content"][0]["annotations"] == [
        {"type": "url_citation", "url": "https://a.org", "title": "A", "start_index": 0, "end_index": 11}
    ]
    assert body["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 14,
    }
    assert body["self_search"]["searches"][0]["query"] == "Hamlet author"
    assert body["store"] is False
    assert (body["metadata"], body["temperature"], body["tools"]) == ({"k": "v"}, 0.2, [WEB])


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": "auto"},
        {"tool_choice": "none"},
        {"tool_choice": "required"},
        {"tool_choice": {"type": "web_search_preview"}},
        {
            "tools": [
                {
                    "type": "web_search_preview",
                    "search_context_size": "high",
                    "search_content_types": ["text"],
                }
            ]
        },
        {"tools": [{"type": "web_search_2025_08_26", "search_context_size": "low"}]},
        {"instructions": "Be brief.", "max_output_tokens": 50, "top_p": 0.5, "user": "u", "store": True},
        {"text": {"format": {"type": "text"}, "verbosity": "medium"}},
    ],
)
def test_every_accepted_request_echoes_into_a_valid_response(fields: dict[str, Any]) -> None:
    Response.model_validate(to_response(chat_result(), converted(**fields)))


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [WEB, FUNCTION], "tool_choice": {"type": "function", "name": "get_weather"}},
        {
            "text": {
                "format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}
            }
        },
        {"text": {"format": {"type": "json_object"}}},
    ],
)
def test_tool_and_format_requests_echo_into_a_valid_response(fields: dict[str, Any]) -> None:
    Response.model_validate(to_response(chat_result(), converted(**fields)))


def test_a_length_finish_is_incomplete() -> None:
    body = to_response(chat_result(finish_reason="length"), converted())
    parsed = Response.model_validate(body)
    assert parsed.status == "incomplete"
    assert parsed.incomplete_details is not None and parsed.incomplete_details.reason == "max_output_tokens"
    assert body["output"][-1]["status"] == "incomplete"


def test_tool_calls_become_function_call_items() -> None:
    calls = [
        {
            "id": "call_9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    body = to_response(chat_result(answer="", finish_reason="tool_calls", tool_calls=calls), converted())
    parsed = Response.model_validate(body)
    assert [i.type for i in parsed.output] == ["web_search_call", "function_call"]
    item = body["output"][1]
    assert item["id"].startswith("fc_")
    assert {k: item[k] for k in ("call_id", "name", "arguments", "status")} == {
        "call_id": "call_9",
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
        "status": "completed",
    }
    assert parsed.status == "completed"


# ----- the route, in process ----------------------------------------------------------------


def responses_post(
    payload: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> tuple[httpx.Response, ScriptedEngine]:
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/responses", json=payload)

    return run_app(engine, body, backend=FakeBackend(), monkeypatch=monkeypatch, **settings), engine


def test_route_runs_self_search_for_a_web_search_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    response, engine = responses_post(request(self_search={"policy": "always"}), monkeypatch)
    assert response.status_code == 200, response.text
    body = response.json()
    parsed = Response.model_validate(body)
    assert parsed.output_text == "Paris"
    web, message = body["output"]
    assert web["type"] == "web_search_call"
    assert web["action"]["query"] == body["self_search"]["searches"][0]["query"] == "capital of France"
    assert web["action"]["sources"] == [
        {"type": "url", "url": "https://en.wikipedia.org/wiki/Paris"},
        {"type": "url", "url": "https://en.wikipedia.org/wiki/France"},
    ]
    assert {a["url"] for a in message["content"][0]["annotations"]} == {d.url for d in DOCS}
    assert body["self_search"]["searches"][0]["information"].startswith(INFO[:20])
    assert body["usage"]["input_tokens"] == sum(len(c.prompt) for c in engine.calls)


def test_route_never_policy_self_fills(monkeypatch: pytest.MonkeyPatch) -> None:
    response, _ = responses_post(request(self_search={"policy": "never"}), monkeypatch)
    assert response.status_code == 200, response.text
    body = response.json()
    Response.model_validate(body)
    assert [i["type"] for i in body["output"]] == ["reasoning", "message"]
    assert body["output"][0]["content"][0]["text"] == body["self_search"]["searches"][0]["information"]


def test_route_self_searches_on_a_no_self_search_server(monkeypatch: pytest.MonkeyPatch) -> None:
    response, _ = responses_post(request(tool_choice="required"), monkeypatch, self_search=False)
    assert response.status_code == 200, response.text
    assert [i["type"] for i in response.json()["output"]] == ["web_search_call", "message"]


def test_route_errors_name_the_responses_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    response, engine = responses_post(
        request(tools=[{"type": "web_search", "user_location": {"city": "x"}}]), monkeypatch
    )
    assert assert_error(response, 400, "tools[0].user_location")["code"] == "unsupported_parameter"
    assert engine.calls == []
    response, _ = responses_post(request(max_output_tokens=99), monkeypatch, max_tokens_limit=50)
    assert "max_output_tokens" in assert_error(response, 400, "max_output_tokens")["message"]
    response, _ = responses_post(request(model="other"), monkeypatch)
    assert_error(response, 404, "model")


def test_route_without_web_search_still_goes_to_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scripted engine has no vLLM serving layer: the forward answers 404 "not available".
    response, engine = responses_post({"model": MODEL, "input": "hi"}, monkeypatch)
    assert response.json()["error"]["code"] == "not_available"
    assert engine.calls == []


@pytest.mark.parametrize(
    "fields",
    [
        {"instructions": 3},
        {"user": ["u"]},
        {"store": "yes"},
        {"parallel_tool_calls": "no"},
        {"metadata": {"k": 1}},
        {"metadata": []},
        {"input": [3]},
        {"input": [{"role": "user", "content": [3]}]},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": 3}]}]},
        {"input": [{"role": "user", "content": {"text": "x"}}]},
        {"input": [{"role": "user", "content": "x", "extra": 1}]},
        {"input": [{"type": {}, "role": "user", "content": "x"}]},
        {"input": [{"type": "function_call", "call_id": 1, "name": "f", "arguments": "{}"}]},
        {"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]},
        {"tools": [WEB, 3]},
        {"tools": [WEB, {"type": "function"}]},
        {"tool_choice": 3},
        {"text": "json"},
        {"text": {"format": "json"}},
        {"text": {"format": {"type": "json_schema"}}},
        {"self_search": "on"},
        {"self_search": {"votes": 0}},
        {"temperature": "hot"},
        {"stream": "no"},
        {"include": [{}]},
        {"reasoning": "high"},
    ],
)
def test_malformed_values_are_400s(fields: dict[str, Any]) -> None:
    error = refused(request(**fields))
    assert error.param and error.code in ("invalid_value", "unsupported_parameter")


# ----- the stream ---------------------------------------------------------------------------


def replayed(body: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Every event parsed as the SDK's ResponseStreamEvent, and what the SDK's stream helper
    (`client.responses.stream`) makes of them."""
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_python(e) for e in stream_events(body)]
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=body["tools"], text_format=omit)
    handled = [out for event in events for out in state.handle_event(event)]
    return events, handled


@pytest.mark.parametrize(
    "result",
    [
        chat_result(
            trace={"searches": [search("external", "q1", urls=("https://a.org",)), search("internal", "q2")]}
        ),
        chat_result(finish_reason="length"),
        chat_result(
            answer="",
            finish_reason="tool_calls",
            tool_calls=[
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
            ],
        ),
    ],
)
def test_stream_events_are_openai_events_that_accumulate_to_the_response(
    result: ChatCompletionResponse,
) -> None:
    body = to_response(result, converted(stream=True))
    events, handled = replayed(body)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
    assert events[-1].type == final
    assert events[-1].response.model_dump(exclude_none=True) == Response.model_validate(body).model_dump(
        exclude_none=True
    )
    added = [e for e in events if e.type == "response.output_item.added"]
    done = [e for e in events if e.type == "response.output_item.done"]
    assert (
        [e.output_index for e in added] == [e.output_index for e in done] == list(range(len(body["output"])))
    )
    assert [e.item.model_dump(exclude_none=True) for e in done] == [
        Response.model_validate(body).output[i].model_dump(exclude_none=True)
        for i in range(len(body["output"]))
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == Response.model_validate(body).output_text
    # The SDK's helper accumulates the same output.
    assert handled[-1].type == final
    assert [i.type for i in handled[-1].response.output] == [i["type"] for i in body["output"]]
    assert handled[-1].response.output_text == Response.model_validate(body).output_text


def test_sse_names_each_event() -> None:
    body = to_response(chat_result(), converted(stream=True))
    blocks = list(sse_stream(body))
    assert all(b.startswith("event: response.") and "\ndata: {" in b and b.endswith("\n\n") for b in blocks)
    assert len(blocks) == len(list(stream_events(body)))


def test_route_streams_the_finished_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    response, _ = responses_post(request(stream=True, self_search={"policy": "always"}), monkeypatch)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            name, data = block.split("\n", 1)
            event = adapter.validate_json(data.removeprefix("data: "))
            assert name == f"event: {event.type}"
            events.append(event)
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == "Paris"
    assert [i.type for i in final.response.output] == ["web_search_call", "message"]
