"""Agent libraries at the budgets agents set for extraction steps (issue 35), with self-search
on (ssrl's loop shapes the answer turn) and off (vLLM's serving layer answers under `auto`).

Each test asserts the protocol of ONE response, never the model's text: no exception from the
library, the parsed object present, the finish_reason OpenAI would send, tool arguments that
validate against the tool's `parameters`. The schemas bound their strings (`maxLength`) so a
135M model cannot run a value past a 48-token budget: what is measured is the server's
finish_reason and shapes, not the model's brevity.

docs/agents.md has the table of what these (and tests/e2e/test_agents.py) measure.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import RunningServer
from tests.e2e.test_agents import import_litellm

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

BUDGET = 48
# vLLM 0.32's layer generates a forced tool call inside a structural tag, whose JSON may carry
# any whitespace (its disable_any_whitespace covers response_format schemas, not tool calls):
# the 135M model spends a 48-token budget on newlines and indents inside the arguments. Tool
# calls answered by vLLM's layer get twice the budget; self-search's answer turn is compact.
TOOL_BUDGET = {"on": BUDGET, "off": 2 * BUDGET}
TIMEOUT_S = 300
MODES = {"on": {"self_search": {"enabled": True}}, "off": {"self_search": {"enabled": False}}}
FACT_QUESTION = "Which country is Paris the capital of? Give the city and the country."
WEATHER_QUESTION = "What is the weather like in Paris right now?"


class ShortFact(BaseModel):
    """A structured output that fits a small budget whatever the model writes."""

    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": WEATHER_PARAMETERS,
    },
}


class WeatherArgs(BaseModel):
    """`WEATHER_PARAMETERS` as a model: arguments validate against the tool's schema."""

    model_config = {"extra": "forbid"}
    city: str = Field(max_length=24)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


@pytest.fixture
def sdk(server: RunningServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=TIMEOUT_S
    )
    yield client
    client.close()


def raw_chat(server: RunningServer, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        server.base_url + "/v1/chat/completions", json=body, headers=server.auth_headers, timeout=TIMEOUT_S
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


# ----- the openai SDK ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_openai_parse_at_48_tokens(sdk: openai.OpenAI, model_name: str, mode: str) -> None:
    completion = sdk.chat.completions.parse(
        model=model_name,
        messages=[{"role": "user", "content": FACT_QUESTION}],
        response_format=ShortFact,
        max_tokens=BUDGET,
        temperature=0,
        extra_body=MODES[mode],
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, ShortFact)
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= BUDGET


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_a_forced_tool_call_validates_against_its_parameters(
    sdk: openai.OpenAI, model_name: str, mode: str, tool_choice: str
) -> None:
    choice_value: Any = (
        {"type": "function", "function": {"name": "get_weather"}} if tool_choice == "named" else "required"
    )
    response = sdk.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": WEATHER_QUESTION}],
        tools=[WEATHER_TOOL],
        tool_choice=choice_value,
        max_tokens=TOOL_BUDGET[mode],
        temperature=0,
        extra_body=MODES[mode],
    )
    message = response.choices[0].message
    assert message.tool_calls, response
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    WeatherArgs.model_validate_json(call.function.arguments)  # type: ignore[union-attr]
    # OpenAI (and vLLM) say "stop" for a named call and "tool_calls" for "required"; a
    # self-search answer turn says "tool_calls" for both. Never "length" for a whole call.
    assert response.choices[0].finish_reason in ("tool_calls", "stop")


@pytest.mark.parametrize("mode", list(MODES))
def test_a_forced_streamed_tool_call_validates_too(sdk: openai.OpenAI, model_name: str, mode: str) -> None:
    stream = sdk.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": WEATHER_QUESTION}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=TOOL_BUDGET[mode],
        temperature=0,
        stream=True,
        extra_body=MODES[mode],
    )
    arguments, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                arguments += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    WeatherArgs.model_validate_json(arguments)
    assert finish in ("tool_calls", "stop")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("budget", range(1, 9))
def test_tiny_budgets_answer(server: RunningServer, model_name: str, mode: str, budget: int) -> None:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Who wrote Hamlet?"}],
        "max_tokens": budget,
        "temperature": 0,
        **MODES[mode],
    }
    answer = raw_chat(server, body)
    choice, usage = answer["choices"][0], answer["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= budget, usage
    assert isinstance(choice["message"]["content"], str), choice
    assert choice["finish_reason"] in ("stop", "length")
    if mode == "on":
        assert choice["self_search"]["answered"] is True, choice["self_search"]


def test_a_message_that_calls_a_tool_has_content_null(server: RunningServer, model_name: str) -> None:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": WEATHER_QUESTION}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": BUDGET,
        "temperature": 0,
    }
    message = raw_chat(server, body)["choices"][0]["message"]
    assert "content" in message and message["content"] is None, message


# ----- langchain-openai ----------------------------------------------------------------------


@pytest.fixture
def no_langsmith(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_langsmith")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_at_48_tokens(
    server: RunningServer, model_name: str, mode: str, method: str
) -> None:
    langchain_openai = importlib.import_module("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        base_url=server.base_url + "/v1",
        api_key=server.api_key,
        model=model_name,
        temperature=0,
        max_tokens=BUDGET if method == "json_schema" else TOOL_BUDGET[mode],
        max_retries=0,
        timeout=TIMEOUT_S,
        extra_body=MODES[mode],
    )
    structured = llm.with_structured_output(ShortFact, method=method, include_raw=True)
    result = structured.invoke(FACT_QUESTION)
    assert result["parsing_error"] is None, result
    assert isinstance(result["parsed"], ShortFact), result
    assert result["raw"].response_metadata["finish_reason"] in ("stop", "tool_calls"), result["raw"]


# ----- instructor ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("instructor_mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_at_48_tokens(
    sdk: openai.OpenAI, model_name: str, mode: str, instructor_mode: str
) -> None:
    instructor = importlib.import_module("instructor")
    client = instructor.from_openai(sdk, mode=getattr(instructor.Mode, instructor_mode))
    fact = client.chat.completions.create(
        model=model_name,
        response_model=ShortFact,
        messages=[{"role": "user", "content": FACT_QUESTION}],
        max_retries=0,
        max_tokens=BUDGET if instructor_mode == "JSON_SCHEMA" else TOOL_BUDGET[mode],
        temperature=0,
        extra_body=MODES[mode],
    )
    assert isinstance(fact, ShortFact)


# ----- pydantic-ai ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_pydantic_ai_structured_output_at_48_tokens(
    server: RunningServer, model_name: str, mode: str
) -> None:
    pydantic_ai = importlib.import_module("pydantic_ai")
    from pydantic_ai.providers.openai import OpenAIProvider

    models_openai = importlib.import_module("pydantic_ai.models.openai")
    model_class = getattr(models_openai, "OpenAIChatModel", None) or models_openai.OpenAIModel

    async def go() -> Any:
        provider = OpenAIProvider(base_url=server.base_url + "/v1", api_key=server.api_key)
        agent = pydantic_ai.Agent(
            model_class(model_name, provider=provider),
            output_type=ShortFact,
            retries=0,
            # pydantic-ai asks for its output as a tool call.
            model_settings={"temperature": 0, "max_tokens": TOOL_BUDGET[mode], "extra_body": MODES[mode]},
        )
        return await agent.run(FACT_QUESTION)

    result = asyncio.run(go())
    assert isinstance(result.output, ShortFact)


# ----- litellm -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_litellm_required_tool_call_says_tool_calls(
    server: RunningServer, model_name: str, mode: str
) -> None:
    litellm = import_litellm()
    response = litellm.completion(
        model=f"openai/{model_name}",
        api_base=server.base_url + "/v1",
        api_key=server.api_key,
        messages=[{"role": "user", "content": WEATHER_QUESTION}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=TOOL_BUDGET[mode],
        temperature=0,
        timeout=TIMEOUT_S,
        num_retries=0,
        extra_body=MODES[mode],
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls[:1]
    assert call.function.name == "get_weather"
    WeatherArgs.model_validate(json.loads(call.function.arguments))


# ----- Responses -----------------------------------------------------------------------------


@pytest.mark.parametrize("web_search", [False, True], ids=["vllm-layer", "self-search"])
def test_a_forced_responses_function_call_validates(
    sdk: openai.OpenAI, model_name: str, web_search: bool
) -> None:
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}]
    if web_search:
        tools.append({"type": "web_search"})
    response = sdk.responses.create(
        model=model_name,
        input=WEATHER_QUESTION,
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=TOOL_BUDGET["on" if web_search else "off"],
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, response.output
    assert calls[0].name == "get_weather"
    WeatherArgs.model_validate_json(calls[0].arguments)
