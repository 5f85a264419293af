"""OpenAI's Responses API `web_search` tool end to end: the official `openai` SDK against the
session server (the real default model on vLLM, the default local index).

Each test checks one response against itself (its items against its own `self_search`
trace), never text of two requests: vLLM on CPU is not bit-stable across requests.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types.responses import Response

QUESTION = "Who wrote Hamlet?"
# One search, greedy, short.
SHORT: dict[str, Any] = {"max_turns": 1}


def create(client, model: str, policy: str, **kwargs: Any) -> Response:
    extra = {"self_search": {"policy": policy, **SHORT}}
    extra.update(kwargs.pop("extra_body", {}))
    return client.responses.create(
        model=model,
        input=kwargs.pop("input", QUESTION),
        tools=kwargs.pop("tools", [{"type": "web_search"}]),
        temperature=0,
        extra_body=extra,
        **kwargs,
    )


def trace_of(response: Response) -> dict[str, Any]:
    trace = (response.model_extra or {}).get("self_search")
    assert trace is not None, "self_search trace missing from the response"
    return trace


def test_web_search_tool_runs_an_external_search(openai_client, model_name) -> None:
    response = create(openai_client, model_name, "always")
    # The SDK parsed it; the raw shape parses again as OpenAI's Response.
    Response.model_validate(response.model_dump())
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    trace = trace_of(response)
    externals = [s for s in trace["searches"] if s["decision"] == "external" and s["fallback"] is None]
    assert externals, trace
    calls = [item for item in response.output if item.type == "web_search_call"]
    assert [c.action.query for c in calls] == [s["query"] for s in externals]
    urls = {d["url"] for s in externals for d in s["documents"] if d["url"]}
    assert {source.url for c in calls for source in c.action.sources or []} == urls
    (message,) = [item for item in response.output if item.type == "message"]
    assert response.output[-1] is message
    (text,) = message.content
    assert text.type == "output_text"
    assert response.output_text == text.text
    assert {a.type for a in text.annotations} <= {"url_citation"}
    assert {a.url for a in text.annotations} == urls
    assert all(a.end_index == len(text.text) for a in text.annotations)
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_never_policy_self_fills_as_reasoning(openai_client, model_name) -> None:
    response = create(openai_client, model_name, "never", tools=[{"type": "web_search_preview"}])
    trace = trace_of(response)
    assert trace["searches"] and all(s["decision"] != "external" for s in trace["searches"])
    assert not [item for item in response.output if item.type == "web_search_call"]
    reasoning = [item for item in response.output if item.type == "reasoning"]
    filled = [s for s in trace["searches"] if s["decision"] == "internal"]
    assert [r.summary[0].text for r in reasoning] == [f"Self-filled search: {s['query']}" for s in filled]
    assert [r.content[0].text for r in reasoning if r.content] == [s["information"] for s in filled]
    assert response.output[-1].type == "message"


def test_search_context_size_low_is_one_document(openai_client, model_name) -> None:
    response = create(
        openai_client, model_name, "always", tools=[{"type": "web_search", "search_context_size": "low"}]
    )
    for search in trace_of(response)["searches"]:
        assert len(search["documents"]) <= 1


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {"tools": [{"type": "web_search", "user_location": {"type": "approximate", "city": "Paris"}}]},
            "tools[0].user_location",
        ),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
    ],
)
def test_unsupported_fields_answer_400_naming_them(openai_client, model_name, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        create(openai_client, model_name, "always", **kwargs)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == param
    assert error["code"] == "unsupported_parameter"


def test_a_stream_carries_the_whole_answer(openai_client, model_name) -> None:
    """`stream: true` through the SDK's stream helper: the events accumulate to the final
    response, whose items match its own trace."""
    with openai_client.responses.stream(
        model=model_name,
        input=QUESTION,
        tools=[{"type": "web_search"}],
        temperature=0,
        extra_body={"self_search": {"policy": "always", **SHORT}},
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text
    trace = trace_of(final)
    externals = [s for s in trace["searches"] if s["decision"] == "external" and s["fallback"] is None]
    calls = [item for item in final.output if item.type == "web_search_call"]
    assert [c.action.query for c in calls] == [s["query"] for s in externals]


def test_a_request_without_web_search_still_reaches_vllm(openai_client, model_name) -> None:
    response = openai_client.responses.create(
        model=model_name, input="Say hello.", max_output_tokens=8, temperature=0
    )
    assert response.object == "response"
    assert "self_search" not in (response.model_extra or {})
    assert response.output and all(item.type != "web_search_call" for item in response.output)


def test_a_named_function_tool_yields_a_function_call(openai_client, model_name) -> None:
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
    response = create(
        openai_client,
        model_name,
        "never",
        tools=[{"type": "web_search"}, weather],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, response.output
    for call in calls:
        assert call.name == "get_weather"
        assert call.id and call.id.startswith("fc_") and call.call_id
        assert call.status == "completed"


def test_an_agent_turn_feeds_the_output_and_tool_results_back(openai_client, model_name) -> None:
    """As agent frameworks do: the whole earlier output (reasoning, web_search_call and
    function_call items) plus each call's `function_call_output` is the next turn's input."""
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    tools = [{"type": "web_search"}, weather]
    first = create(
        openai_client,
        model_name,
        "always",
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
        input="What is the weather in Paris?",
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls, first.output
    history: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history += [
        {"type": "function_call_output", "call_id": c.call_id, "output": "Sunny, 21 C"} for c in calls
    ]
    second = create(openai_client, model_name, "never", tools=tools, tool_choice="none", input=history)
    Response.model_validate(second.model_dump())
    assert second.output[-1].type == "message"
    assert not [item for item in second.output if item.type in ("web_search_call", "function_call")]
