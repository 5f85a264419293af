"""Requests that answered 500 but are the client's error (issue 29, item 4): a tool name
outside OpenAI's rule (a lone surrogate in it crashed the tools prompt), a Responses
`tool_choice.name` that is no string (a set lookup raised TypeError), and a JSON schema that
is only a cycle of references (`{"$ref": "#"}`, which the engine compiles to a rule that
derives only itself). Each is now a 400 in OpenAI's shape, before any engine call.

The app runs in process on a scripted engine, with self-search on (the server's default).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

import server.composition
from server.composition import Composition
from server.errors import APIError
from server.schema_check import alias_cycle, check_request_schemas, check_schema
from tests.scripted_engine import ScriptedEngine
from tests.unit.test_composition import SETTINGS, WEATHER
from tests.unit.test_composition import Responder as ToolResponder
from tests.unit.test_self_search_http import MODEL, run_app

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
LOOP = {"$ref": "#"}
TREE = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}


def send(
    path: str, payload: dict[str, Any] | bytes, **settings: Any
) -> tuple[httpx.Response, ScriptedEngine]:
    """POST `payload` (bytes as they are: a lone surrogate travels as the escape `\\ud800`)."""
    engine = ScriptedEngine(responder=ToolResponder())
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(path, content=content, headers={"content-type": "application/json"})

    return run_app(engine, body, **settings), engine


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def function(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or PARAMETERS}}


def json_schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def assert_400(response: httpx.Response, param: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body = json.loads(response.content.decode("utf-8"))  # strict UTF-8
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert error["code"] == "invalid_value"
    return error


# ----- 1. a tool's name, and lone surrogates in what reaches the prompt ----------------------


def test_a_lone_surrogate_in_a_tool_name_is_a_400() -> None:
    raw = (
        b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], '
        b'"tools": [{"type": "function", "function": {"name": "get_\\ud800weather", '
        b'"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}'
    )
    response, engine = send(CHAT, raw)
    error = assert_400(response, "tools.0.function.name")
    assert "64 letters, digits, underscores or dashes" in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize("name", ["get weather", "get_weather\n", "</tools>", "x" * 65, "", "météo"])
def test_a_tool_name_outside_openais_rule_is_a_400(name: str) -> None:
    response, engine = send(CHAT, chat(tools=[function(name)]))
    assert_400(response, "tools.0.function.name")
    assert engine.calls == []


def test_a_tool_name_inside_the_rule_is_served() -> None:
    name = "Get-Weather_2" + "x" * 51  # 64 characters
    response, _ = send(CHAT, chat(tools=[function(name)], tool_choice="required"), **SETTINGS)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("tool", "param"),
    [
        # Escapes as the client's JSON carries them; json.loads makes them lone surrogates.
        (
            {"type": "function", "function": {"name": "f", "description": "\ud800"}},
            "tools.0.function.description",
        ),
        (
            function("f", {"type": "object", "properties": {"\udc00": {"type": "string"}}}),
            "tools.0.function.parameters",
        ),
        ({"type": "function", "function": {"name": "f", "strict": "\ud800"}}, "tools.0"),
        ({"type": "function", "function": {"name": "f"}, "note": ["\ud800"]}, "tools.0"),
    ],
)
def test_a_lone_surrogate_elsewhere_in_a_tool_is_a_400(tool: dict[str, Any], param: str) -> None:
    response, engine = send(CHAT, chat(tools=[tool]))
    assert "lone surrogate" in assert_400(response, param)["message"]
    assert engine.calls == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "\ud800"}}},
            "tool_choice",
        ),
        ({"response_format": json_schema({"type": "string", "enum": ["\ud800"]})}, "response_format"),
        ({"structured_outputs": {"choice": ["a", "\udfff"]}}, "structured_outputs"),
    ],
)
def test_a_lone_surrogate_in_a_shaping_field_is_a_400(fields: dict[str, Any], param: str) -> None:
    response, engine = send(CHAT, chat(**fields))
    assert "lone surrogate" in assert_400(response, param)["message"]
    assert engine.calls == []


def test_the_tools_prompt_escapes_what_utf8_cannot_encode() -> None:
    # Validation keeps lone surrogates out; the prompt stays encodable if one slips through.
    tool = {"type": "function", "function": {"name": "f", "description": "a\ud800b"}}
    prompt = Composition(tool_mode="auto", tools=[tool]).tools_prompt()
    assert "a\\ud800b" in prompt
    prompt.encode("utf-8")


# ----- 2. a Responses tool_choice whose name is no string ----------------------------------

WEB_SEARCH = {"type": "web_search"}
RESPONSES_FUNCTION = {"type": "function", "name": "a", "parameters": PARAMETERS}


def responses(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "What is the weather in Paris?", **fields}


@pytest.mark.parametrize("name", [["a"], {"name": "a"}, 3])
def test_a_responses_tool_choice_name_that_is_no_string_is_a_400_with_web_search(name: Any) -> None:
    choice = {"type": "function", "name": name}
    response, engine = send(RESPONSES, responses(tools=[WEB_SEARCH, RESPONSES_FUNCTION], tool_choice=choice))
    assert_400(response, "tool_choice.name")
    assert engine.calls == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [RESPONSES_FUNCTION], "tool_choice": {"type": "function", "name": ["a"]}},
            "tool_choice.name",
        ),
        (
            {"tools": [RESPONSES_FUNCTION], "tool_choice": {"type": ["function"], "name": "a"}},
            "tool_choice.type",
        ),
        ({"tools": [RESPONSES_FUNCTION], "tool_choice": ["a"]}, "tool_choice"),
        ({"tools": 3, "tool_choice": "auto"}, "tools"),
    ],
)
def test_responses_tool_shapes_are_checked_before_the_forward_to_vllm(
    fields: dict[str, Any], param: str
) -> None:
    # No web_search tool: vLLM's Responses layer would answer, and its validators raise
    # TypeError on these shapes (`len(3)`, a list looked up in a set).
    response, engine = send(RESPONSES, responses(**fields))
    assert_400(response, param)
    assert engine.calls == []


def test_a_responses_function_name_outside_the_rule_is_a_400_naming_its_index() -> None:
    tool = {**RESPONSES_FUNCTION, "name": "get_\ud800weather"}
    response, _ = send(RESPONSES, responses(tools=[WEB_SEARCH, tool]))
    assert_400(response, "tools[1].name")


# ----- 3. a schema that is only a cycle of references ---------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": json_schema(LOOP)}, "response_format"),
        (
            {
                "response_format": json_schema(
                    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
                )
            },
            "response_format",
        ),
        ({"structured_outputs": {"json": LOOP}}, "structured_outputs"),
        ({"structured_outputs": {"json": json.dumps(LOOP)}}, "structured_outputs"),
        (
            {"tools": [function("f", LOOP)], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tools[0].function.parameters",
        ),
    ],
)
def test_a_schema_of_pure_references_is_a_400_before_any_search(fields: dict[str, Any], param: str) -> None:
    response, engine = send(CHAT, chat(**fields))
    assert "describes no value" in assert_400(response, param)["message"]
    assert engine.calls == []


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [WEB_SEARCH], "text": {"format": {"type": "json_schema", "name": "x", "schema": LOOP}}},
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": LOOP}}},  # forwarded to vLLM
    ],
)
def test_a_responses_schema_of_pure_references_is_a_400(fields: dict[str, Any]) -> None:
    response, engine = send(RESPONSES, responses(**fields))
    assert_400(response, "text.format")
    assert engine.calls == []


@pytest.mark.parametrize(
    "schema",
    [
        TREE,
        {"anyOf": [{"$ref": "#"}, {"type": "string"}]},
        {"$ref": "#/$defs/city", "$defs": {"city": PARAMETERS}},
    ],
)
def test_recursive_schemas_that_make_progress_are_served(schema: dict[str, Any]) -> None:
    response, engine = send(CHAT, chat(response_format=json_schema(schema)), **SETTINGS)
    assert response.status_code == 200, response.text
    assert engine.calls[-1].options.structured is not None


def test_a_recursion_error_while_shaping_is_a_400(monkeypatch: pytest.MonkeyPatch) -> None:
    def deep(*_: Any) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(server.composition, "_shape", deep)
    response, engine = send(CHAT, chat(response_format=json_schema(TREE)))
    assert "nested too deeply" in assert_400(response, "response_format")["message"]
    assert engine.calls == []


# ----- the check itself (what the forward to vLLM calls) --------------------------------------

DEFS_LOOP = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}


@pytest.mark.parametrize(
    ("schema", "pointer"),
    [
        (LOOP, "#"),
        (DEFS_LOOP, "#"),
        ({"$ref": "#", "type": "object"}, "#"),  # the sibling still needs the alias
        ({"allOf": [{"$ref": "#"}]}, "#"),
        ({"anyOf": [{"$ref": "#"}]}, "#"),
        ({"oneOf": [{"$ref": "#/oneOf/1"}, {"$ref": "#/oneOf/0"}]}, "#"),
        ({"type": "object", "properties": {"a/b": {"$ref": "#/properties/a~1b"}}}, "#/properties/a~1b"),
        (TREE, None),
        ({"anyOf": [{"$ref": "#"}, {"type": "string"}]}, None),
        ({"anyOf": [True, {"$ref": "#"}]}, None),
        (
            {
                "$ref": "#/$defs/n",
                "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
            },
            None,
        ),
        ({"type": "string", "$defs": {"unused": {"$ref": "#/$defs/unused"}}}, None),
        ({"$ref": "https://example.org/schema"}, None),  # not local: the engine judges it
        ({"$ref": "#/nowhere"}, None),
        ({}, None),
        (True, None),
    ],
)
def test_alias_cycle(schema: Any, pointer: str | None) -> None:
    assert alias_cycle(schema) == pointer


def test_the_check_never_recurses() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(20_000):
        deep = {"type": "array", "items": deep}
    assert alias_cycle(deep) is None
    looped: dict[str, Any] = {"$ref": "#"}
    for _ in range(20_000):
        looped = {"allOf": [looped]}
    assert alias_cycle(looped) == "#"
    with pytest.raises(APIError) as info:
        check_schema(looped, "response_format")
    assert (info.value.status, info.value.param) == (400, "response_format")


def test_check_request_schemas_names_each_field() -> None:
    def param_of(body: dict[str, Any]) -> str | None:
        try:
            check_request_schemas(body)
        except APIError as exc:
            assert exc.status == 400 and exc.code == "invalid_value"
            return exc.param
        return None

    assert param_of({"response_format": json_schema(LOOP)}) == "response_format"
    assert param_of({"structured_outputs": {"json": LOOP}}) == "structured_outputs"
    assert param_of({"text": {"format": {"type": "json_schema", "schema": LOOP}}}) == "text.format"
    assert param_of({"tools": [function("f"), function("g", LOOP)]}) == "tools[1].function.parameters"
    assert (
        param_of({"tools": [{"type": "function", "name": "g", "parameters": LOOP}]}) == "tools[0].parameters"
    )
    assert param_of({"structured_outputs": {"json": "[" * 100_000}}) == "structured_outputs"
    assert param_of({"response_format": json_schema(TREE), "tools": [function("f")], "text": "x"}) is None
    assert param_of({"response_format": {"type": "json_object"}, "structured_outputs": {"json": "{"}}) is None
