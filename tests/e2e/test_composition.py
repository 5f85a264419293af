"""Self-search with the agent's own tools and output schema, on the real default model: the
searches run, then the final turn is a valid tool call or schema-valid JSON (server/composition.py).

Forced tool choice and JSON schemas make these deterministic in shape on a 135M model; each
test checks one response against itself (the call against the trace, the content against
its own transcript), never text across two requests.
"""

from __future__ import annotations

import json

from router.tags import extract_last_answer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ALWAYS = {"self_search": {"policy": "always"}}


def ask(http, auth_headers, model_name: str, **fields):
    body = {
        "model": model_name,
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
        ],
        "temperature": 0,
        "max_tokens": 512,
        **fields,
    }
    response = http.post("/v1/chat/completions", json=body, headers=auth_headers, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_forced_tool_call_follows_the_searches(http, auth_headers, model_name) -> None:
    body = ask(http, auth_headers, model_name, tools=[WEATHER], tool_choice=NAMED, **ALWAYS)
    choice = body["choices"][0]
    trace = choice["self_search"]
    assert trace["searches"] and trace["searches"][0]["decision"] == "external"
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert isinstance(arguments["city"], str)
    # The call is the transcript's own answer turn.
    assert json.loads(extract_last_answer(choice["message"]["reasoning"]) or "") == arguments
    assert 0 < body["usage"]["protocol_prompt_tokens"] < body["usage"]["prompt_tokens"]


def test_required_tool_choice_yields_calls(http, auth_headers, model_name) -> None:
    choice = ask(http, auth_headers, model_name, tools=[WEATHER], tool_choice="required")["choices"][0]
    assert choice["self_search"]["turns"] >= 1
    assert choice["finish_reason"] == "tool_calls"
    assert {c["function"]["name"] for c in choice["message"]["tool_calls"]} == {"get_weather"}
    for c in choice["message"]["tool_calls"]:
        assert "city" in json.loads(c["function"]["arguments"])


def test_a_json_schema_answer_after_the_searches(http, auth_headers, model_name) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "Weather", "schema": schema, "strict": True}}
    choice = ask(http, auth_headers, model_name, response_format=fmt, **ALWAYS)["choices"][0]
    assert choice["self_search"]["searches"][0]["decision"] == "external"
    parsed = json.loads(choice["message"]["content"])
    assert set(parsed) == {"city", "sunny"} and isinstance(parsed["sunny"], bool)
    assert choice["message"]["content"] == extract_last_answer(choice["message"]["reasoning"])


def test_a_streamed_tool_call(http, auth_headers, model_name) -> None:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
        "temperature": 0,
        "max_tokens": 512,
        "stream": True,
        "tools": [WEATHER],
        "tool_choice": NAMED,
    }
    chunks = []
    with http.stream(
        "POST", "/v1/chat/completions", json=body, headers=auth_headers, timeout=600
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    reasoning = "".join(d["delta"].get("reasoning") or "" for d in deltas)
    calls = [d["delta"]["tool_calls"] for d in deltas if d["delta"].get("tool_calls")]
    assert len(calls) == 1
    assert json.loads(calls[0][0]["function"]["arguments"]) == json.loads(
        extract_last_answer(reasoning) or ""
    )
    assert not any(d["delta"].get("content") for d in deltas)
    assert [d["finish_reason"] for d in deltas if d.get("finish_reason")] == ["tool_calls"]


def test_web_search_options_switch_self_search_on(http, auth_headers, model_name) -> None:
    body = ask(
        http,
        auth_headers,
        model_name,
        web_search_options={"search_context_size": "high"},
        self_search={"policy": "always"},
    )
    search = body["choices"][0]["self_search"]["searches"][0]
    assert search["decision"] == "external"
    # high: five documents per search (the index holds far more than five matches).
    assert len(search["documents"]) == 5
