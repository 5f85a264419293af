"""Self-search with the agent's own tools, output schema and stop strings (server/composition.py),
on a scripted engine: the searches run free, the answer turn is shaped, the response carries
tool calls or schema-valid content, and bad tools or schemas get vLLM's 400s."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.scripted_engine import Call, Script, ScriptedEngine, script
from tests.unit.test_http_layer import CHAT, MODEL, chat, post, sse_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
SETTINGS: dict[str, Any] = {"self_search": True, "search": "none", "search_mode": "guided"}


class Responder:
    """Answers each guided call by what it is: the query, the self-fill, or the answer (whose
    text depends on the constraint it runs under)."""

    def __init__(self, free_answer: str = "Paris") -> None:
        self.free_answer = free_answer

    def __call__(self, call: Call) -> Script:
        stops = call.options.stop
        if "</search>" in stops:
            return script(" weather in Paris</search>")
        if "</information>" in stops:
            return script("Paris is sunny in summer.</information>")
        structured = call.options.structured
        if structured is None:
            return script(self.free_answer)
        schema = structured.get("json")
        if isinstance(schema, dict) and schema.get("type") == "array":
            return script('[{"name": "get_weather", "parameters": {"city": "Paris"}}]')
        return script('{"city": "Paris"}')


def run(
    body: dict[str, Any], responder: Responder | None = None, **settings: Any
) -> tuple[ScriptedEngine, Any]:
    engine = ScriptedEngine(responder=responder or Responder())
    response = post(engine, CHAT, body, **{**SETTINGS, **settings})
    return engine, response


def test_a_named_tool_is_called_after_the_searches() -> None:
    engine, response = run(chat(tools=[WEATHER], tool_choice=NAMED))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"].get("content") is None
    # The search ran first, free; only the answer turn ran under the tool's schema.
    assert choice["self_search"]["searches"][0]["query"] == "weather in Paris"
    assert "<search> weather in Paris </search>" in choice["message"]["reasoning"]
    query, fill, answer = engine.calls
    assert query.options.structured is None and fill.options.structured is None
    assert answer.options.structured is not None
    assert answer.options.structured["json"]["required"] == ["city"]
    # The model was shown the tool it may call.
    assert '"get_weather"' in query.prompt_text


def test_required_tool_choice_returns_every_call() -> None:
    _, response = run(chat(tools=[WEATHER], tool_choice="required"))
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]


def test_auto_tool_choice_reads_a_hermes_call_or_an_answer() -> None:
    call_text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    _, called = run(chat(tools=[WEATHER]), Responder(call_text))
    choice = called.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", called.text
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    _, answered = run(chat(tools=[WEATHER], tool_choice="auto"), Responder("Sunny"))
    choice = answered.json()["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("stop", "Sunny")
    assert "tool_calls" not in choice["message"]


def test_auto_tool_choice_needs_a_parser_with_an_operator_model() -> None:
    _, response = run(chat(tools=[WEATHER]), model="/some/model", served_model_name=MODEL)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tool_choice"


def test_tool_choice_none_answers_in_words() -> None:
    engine, response = run(chat(tools=[WEATHER], tool_choice="none"))
    choice = response.json()["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("stop", "Paris")
    assert engine.calls[-1].options.structured is None


def test_a_json_schema_shapes_the_answer() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "City", "schema": schema, "strict": True}}
    engine, response = run(chat(response_format=fmt))
    choice = response.json()["choices"][0]
    assert json.loads(choice["message"]["content"]) == {"city": "Paris"}
    assert choice["finish_reason"] == "stop"
    assert engine.calls[-1].options.structured is not None
    assert engine.calls[-1].options.structured["json"] == schema
    assert all(c.options.structured is None for c in engine.calls[:-1])


def test_usage_reports_what_the_protocol_adds() -> None:
    _, response = run(chat())
    usage = response.json()["usage"]
    assert 0 < usage["protocol_prompt_tokens"] < usage["prompt_tokens"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": NAMED}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
        ({"response_format": {"type": "json_schema"}}, None),
        (
            {"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_tools_and_schemas_are_400_not_500(fields: dict[str, Any], param: str | None) -> None:
    _, response = run(chat(**fields))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_web_search_options_switch_self_search_on_and_size_the_documents() -> None:
    _, response = run(chat(web_search_options={"search_context_size": "high"}), self_search=False)
    assert response.status_code == 200, response.text
    assert "self_search" in response.json()["choices"][0]
    bad = run(chat(web_search_options={"user_location": {"type": "approximate"}}), self_search=False)[1]
    assert bad.status_code == 400
    assert bad.json()["error"]["param"].startswith("web_search_options")
    off = run(chat(web_search_options={}, self_search={"enabled": False}))[1]
    assert off.status_code == 400
    assert off.json()["error"]["param"] == "web_search_options"


def test_a_streamed_tool_call_arrives_whole_before_the_finish() -> None:
    _, response = run(chat(tools=[WEATHER], tool_choice=NAMED, stream=True))
    events = [e for e in sse_events(response) if e != "[DONE]"]
    contents = [c["delta"].get("content") for e in events for c in e["choices"] if c["delta"].get("content")]
    assert contents == []  # the call's JSON is not content
    calls = [c["delta"]["tool_calls"] for e in events for c in e["choices"] if c["delta"].get("tool_calls")]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert calls[0][0]["function"]["name"] == "get_weather"
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert finishes == ["tool_calls"]


def test_a_tool_result_continues_the_conversation() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    engine, response = run({**chat(), "messages": history, "tools": [WEATHER]}, Responder("Sunny"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Sunny"
    # The model reads its earlier call and the tool's result.
    prompt = engine.calls[0].prompt_text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "Sunny, 21 C" in prompt
