"""Agent libraries on ssrl with self-search on: the `openai` SDK, langchain-openai, litellm,
the OpenAI Agents SDK, pydantic-ai and instructor, each through its own documented way of
asking for a tool call or a structured output.

Self-search stays on (the server's default for chat): the searches run as usual, then the
final turn is generated under structured outputs, so it is a valid tool call or
schema-valid JSON. Every request is forced (a named or required tool choice, a JSON schema)
so that a 135M model gives a checkable result; `policy always` (or `never`) makes the search
decision deterministic where a test asserts it.

Each test records the HTTP exchanges of its library (an event hook on the library's own
httpx client), so it can check three things of ONE response: the library sent what it was
asked to, the server's raw answer carries the self-search trace and a tagged transcript, and
the library's parsed object is exactly the raw tool call / JSON. No text is compared across
two engine requests (vLLM on CPU is not bit-stable between requests).

The libraries are test dependencies (the `test` extra; instructor is installed by
scripts/setup.sh without its pins, which would drag the `openai` SDK back, see pyproject.toml);
a missing one fails its tests rather than skipping them.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from router.tags import INFORMATION, SEARCH, find_tag_blocks
from tests.conftest import RunningServer

# litellm fetches its model price list from GitHub at import unless told to use its bundled
# copy; a test must not need the web (set before anything imports litellm).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Enough for the trajectory (query, information, final turn) of the guided protocol.
MAX_TOKENS = 384
TIMEOUT_S = 300
DECISIONS = {"external", "internal", "skipped"}
ALWAYS: dict[str, Any] = {"self_search": {"policy": "always", "max_turns": 1}}
NEVER: dict[str, Any] = {"self_search": {"policy": "never", "max_turns": 1}}

WEATHER_QUESTION = "What is the weather like in Paris right now?"
FACT_QUESTION = "Which country is Paris the capital of? Give the city and the country."
WEATHER_MESSAGES: Any = [{"role": "user", "content": WEATHER_QUESTION}]
FACT_MESSAGES: Any = [{"role": "user", "content": FACT_QUESTION}]
UNITS = ("celsius", "fahrenheit")

# The tool every test offers, in the OpenAI wire format (strict: exactly these keys).
# Typed `Any`: the SDK's TypedDict params would reject a plain dict literal kept in a constant.
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": list(UNITS)},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
NAMED_CHOICE: Any = {"type": "function", "function": {"name": "get_weather"}}


class CityFact(BaseModel):
    """The structured output every schema test asks for."""

    city: str = Field(description="The city")
    country: str = Field(description="The country the city is in")


class WeatherReport(BaseModel):
    """pydantic-ai's output type, produced after its weather tool ran (no free-text field: a
    135M model can run a long string past any budget)."""

    city: str
    temperature: int
    unit: Literal["celsius", "fahrenheit"]


def fake_weather(city: str, unit: str) -> str:
    degrees = "18 °C" if unit == "celsius" else "64 °F"
    return f"{city}: sunny, {degrees}"


# ----- recording the exchanges of a library's own HTTP client ------------------------------


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    request: Any
    response: Any


@dataclass
class Recorder:
    """Event hooks for the httpx client a library is given: every exchange, bodies parsed."""

    exchanges: list[Exchange] = field(default_factory=list)

    def _record(self, response: Any) -> None:
        request = response.request
        try:
            sent = json.loads(request.content) if request.content else None
        except ValueError:
            sent = request.content
        try:
            got = response.json()
        except ValueError:
            got = response.text
        self.exchanges.append(Exchange(request.method, request.url.path, response.status_code, sent, got))

    def _hook(self, response: Any) -> None:
        response.read()
        self._record(response)

    async def _ahook(self, response: Any) -> None:
        await response.aread()
        self._record(response)

    def client(self) -> Any:
        """A sync client of the httpx flavour the installed `openai` SDK uses."""
        return openai.DefaultHttpxClient(event_hooks={"response": [self._hook]}, timeout=TIMEOUT_S)

    def async_client(self) -> Any:
        return openai.DefaultAsyncHttpxClient(event_hooks={"response": [self._ahook]}, timeout=TIMEOUT_S)

    def posts(self, route: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == "POST" and e.path.endswith(route)]

    def chats(self) -> list[Exchange]:
        chats = self.posts("/chat/completions")
        for exchange in chats:
            assert exchange.status == 200, (exchange.status, exchange.request, exchange.response)
        return chats

    def only_chat(self) -> Exchange:
        chats = self.chats()
        assert len(chats) == 1, [(e.path, e.status) for e in self.exchanges]
        return chats[0]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


# ----- what every self-search answer must carry --------------------------------------------


def blocks(transcript: str, tag: str) -> list[str]:
    """The stripped contents of the top-level `tag` blocks, as the trace reports queries."""
    return [b.content(transcript).strip() for b in find_tag_blocks(transcript) if b.tag == tag]


def assert_self_searched(
    raw: dict[str, Any], *, decision: str | None = None, continuation: bool = False
) -> Any:
    """The raw answer carries the trace and the tagged transcript of the searches that ran
    before the final turn; returns the choice.

    `decision`: what the policy forces for every search the model gave a query. A search the
    model leaves empty is `skipped` whatever the policy (nothing to search); that is allowed
    only on a `continuation` (after a tool result the small model often has nothing to ask),
    while a fresh question must show at least one search that ran."""
    choice = raw["choices"][0]
    trace = choice.get("self_search")
    assert isinstance(trace, dict), f"no self_search trace on the choice: {choice}"
    searches = trace["searches"]
    assert searches, trace
    assert {s["decision"] for s in searches} <= DECISIONS, trace
    assert all((s["decision"] == "skipped") == (s["query"] == "") for s in searches), trace
    ran = [s for s in searches if s["decision"] != "skipped"]
    assert ran or continuation, f"no search ran: {trace}"
    assert trace["external_calls"] == sum(s["decision"] == "external" for s in searches), trace
    assert trace["turns"] >= 1, trace
    if decision is not None:
        assert {s["decision"] for s in ran} <= {decision}, trace
    reasoning = choice["message"].get("reasoning")
    assert isinstance(reasoning, str), choice["message"]
    assert blocks(reasoning, SEARCH) == [s["query"] for s in searches], (reasoning, searches)
    # One information block per search that ran (inserted documents or self-filled).
    assert len(blocks(reasoning, INFORMATION)) == len(ran), (reasoning, searches)
    return choice


def assert_weather_call(raw: dict[str, Any], *, decision: str | None = None) -> dict[str, Any]:
    """A self-searched answer whose final turn is one valid `get_weather` call; returns the
    call's arguments."""
    choice = assert_self_searched(raw, decision=decision)
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"].get("tool_calls")
    assert isinstance(calls, list) and len(calls) == 1, choice["message"]
    call = calls[0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather", call
    assert isinstance(call["id"], str) and call["id"].startswith("call_"), call
    args = json.loads(call["function"]["arguments"])
    assert isinstance(args, dict), call
    assert isinstance(args["city"], str) and args["unit"] in UNITS, args
    return args


def assert_fact_json(raw: dict[str, Any], *, decision: str | None = None) -> CityFact:
    """A self-searched answer whose content is JSON valid for `CityFact`."""
    choice = assert_self_searched(raw, decision=decision)
    assert choice["finish_reason"] == "stop", choice
    content = choice["message"]["content"]
    assert isinstance(content, str), choice["message"]
    return CityFact.model_validate_json(content)


def sent_json_schema(request: dict[str, Any]) -> Any:
    response_format = request.get("response_format")
    assert isinstance(response_format, dict) and response_format["type"] == "json_schema", request
    return response_format["json_schema"]


# ----- 1. the openai SDK --------------------------------------------------------------------


@pytest.fixture
def sdk(server: RunningServer, recorder: Recorder) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=server.base_url + "/v1",
        api_key=server.api_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        http_client=recorder.client(),
    )
    yield client
    client.close()


def test_openai_parse_with_a_pydantic_model(sdk: openai.OpenAI, recorder: Recorder, model_name: str) -> None:
    completions: Any = sdk.chat.completions
    parse = completions.parse if hasattr(completions, "parse") else sdk.beta.chat.completions.parse
    completion = parse(
        model=model_name,
        messages=FACT_MESSAGES,
        response_format=CityFact,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=ALWAYS,
    )
    exchange = recorder.only_chat()
    schema = sent_json_schema(exchange.request)
    assert schema["strict"] is True and set(schema["schema"]["properties"]) == {"city", "country"}
    fact = assert_fact_json(exchange.response, decision="external")
    message = completion.choices[0].message
    assert message.parsed == fact
    assert message.tool_calls in (None, [])
    # The SDK keeps the extension fields on its typed objects.
    raw_choice = exchange.response["choices"][0]
    assert (completion.choices[0].model_extra or {}).get("self_search") == raw_choice["self_search"]
    assert (message.model_extra or {}).get("reasoning") == raw_choice["message"]["reasoning"]


def test_openai_named_tool_call(sdk: openai.OpenAI, recorder: Recorder, model_name: str) -> None:
    response = sdk.chat.completions.create(
        model=model_name,
        messages=WEATHER_MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice=NAMED_CHOICE,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=ALWAYS,
    )
    raw = recorder.only_chat().response
    args = assert_weather_call(raw, decision="external")
    assert set(args) == {"city", "unit"}  # strict schema: no other key
    call = response.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert json.loads(call.function.arguments) == args  # type: ignore[union-attr]
    assert response.choices[0].finish_reason == "tool_calls"
    usage = response.usage
    assert usage is not None
    protocol = (usage.model_extra or {}).get("protocol_prompt_tokens")
    assert isinstance(protocol, int) and 0 < protocol < usage.prompt_tokens, usage


def test_openai_required_tool_choice(sdk: openai.OpenAI, recorder: Recorder, model_name: str) -> None:
    sdk.chat.completions.create(
        model=model_name,
        messages=WEATHER_MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    # The server's default policy decides the search; whichever it chose, it is traced.
    assert_weather_call(recorder.only_chat().response)


def test_openai_auto_tool_choice_answers_or_calls(
    sdk: openai.OpenAI, recorder: Recorder, model_name: str
) -> None:
    sdk.chat.completions.create(
        model=model_name,
        messages=WEATHER_MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=ALWAYS,
    )
    raw = recorder.only_chat().response
    choice = raw["choices"][0]
    if choice["message"].get("tool_calls"):
        assert_weather_call(raw, decision="external")
    else:
        assert_self_searched(raw, decision="external")
        assert choice["finish_reason"] in ("stop", "length"), choice
        assert isinstance(choice["message"]["content"], str), choice


def test_openai_json_object(sdk: openai.OpenAI, recorder: Recorder, model_name: str) -> None:
    response = sdk.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": FACT_QUESTION + " Answer in JSON."}],
        response_format={"type": "json_object"},
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=ALWAYS,
    )
    choice = assert_self_searched(recorder.only_chat().response, decision="external")
    assert isinstance(json.loads(choice["message"]["content"]), dict), choice
    assert response.choices[0].message.content == choice["message"]["content"]


def test_openai_web_search_options_on_chat(sdk: openai.OpenAI, recorder: Recorder, model_name: str) -> None:
    sdk.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
        web_search_options={"search_context_size": "low"},
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=ALWAYS,
    )
    exchange = recorder.only_chat()
    assert exchange.request["web_search_options"] == {"search_context_size": "low"}
    choice = assert_self_searched(exchange.response, decision="external")
    # "low" is one document per search (the default is 3).
    assert [len(s["documents"]) for s in choice["self_search"]["searches"]] == [1], choice["self_search"]


# ----- 2. langchain-openai -------------------------------------------------------------------


@pytest.fixture
def no_langsmith(monkeypatch: pytest.MonkeyPatch) -> None:
    """LangSmith tracing would upload the runs; it is off unless these are set."""
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(name, raising=False)


def langchain_model(server: RunningServer, model_name: str, recorder: Recorder, **kwargs: Any) -> Any:
    langchain_openai = importlib.import_module("langchain_openai")
    return langchain_openai.ChatOpenAI(
        base_url=server.base_url + "/v1",
        api_key=server.api_key,
        model=model_name,
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=TIMEOUT_S,
        http_client=recorder.client(),
        **kwargs,
    )


@pytest.mark.usefixtures("no_langsmith")
def test_langchain_bind_tools_named(server: RunningServer, model_name: str, recorder: Recorder) -> None:
    llm = langchain_model(server, model_name, recorder)
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather of a city."""
        return fake_weather(city, unit)

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(WEATHER_QUESTION)
    exchange = recorder.only_chat()
    assert exchange.request["tool_choice"] == NAMED_CHOICE
    assert "self_search" not in exchange.request  # self-search is the server's default
    args = assert_weather_call(exchange.response)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", args)]
    assert message.tool_calls[0]["id"] == exchange.response["choices"][0]["message"]["tool_calls"][0]["id"]


@pytest.mark.usefixtures("no_langsmith")
def test_langchain_structured_output_json_schema(
    server: RunningServer, model_name: str, recorder: Recorder
) -> None:
    llm = langchain_model(server, model_name, recorder, extra_body=ALWAYS)
    fact = llm.with_structured_output(CityFact, method="json_schema", strict=True).invoke(FACT_QUESTION)
    exchange = recorder.only_chat()
    assert sent_json_schema(exchange.request)["name"] == "CityFact"
    assert isinstance(fact, CityFact)
    assert fact == assert_fact_json(exchange.response, decision="external")


# ----- 3. litellm ----------------------------------------------------------------------------


def import_litellm() -> Any:
    """litellm, imported without the side effect on the suite's loggers: it quiets other
    libraries' loggers (httpx) when imported, so their levels are put back as they were."""
    levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "openai")}
    try:
        return importlib.import_module("litellm")
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_litellm_named_tool_call(server: RunningServer, model_name: str) -> None:
    litellm = import_litellm()
    response = litellm.completion(
        model=f"openai/{model_name}",
        api_base=server.base_url + "/v1",
        api_key=server.api_key,
        messages=WEATHER_MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice=NAMED_CHOICE,
        max_tokens=MAX_TOKENS,
        temperature=0,
        timeout=TIMEOUT_S,
        num_retries=0,
        extra_body=NEVER,
    )
    # litellm keeps the fields it does not know as `provider_specific_fields`: rebuild the
    # server's choice from what a litellm user sees.
    choice = response.choices[0]
    message = choice.message
    seen = {
        "finish_reason": choice.finish_reason,
        "self_search": (getattr(choice, "provider_specific_fields", None) or {}).get("self_search"),
        "message": {
            "content": message.content,
            "reasoning": (getattr(message, "provider_specific_fields", None) or {}).get("reasoning"),
            "tool_calls": [call.model_dump() for call in message.tool_calls or []],
        },
    }
    args = assert_weather_call({"choices": [seen]}, decision="internal")  # policy never: self-filled
    assert seen["self_search"]["external_calls"] == 0
    assert message.reasoning_content == seen["message"]["reasoning"]
    protocol = getattr(response.usage, "protocol_prompt_tokens", None)
    assert isinstance(protocol, int) and 0 < protocol < response.usage.prompt_tokens, response.usage
    assert sorted(args) == ["city", "unit"]


# ----- 4. the OpenAI Agents SDK ----------------------------------------------------------------


def agents_run(
    server: RunningServer, model_name: str, recorder: Recorder, *, responses: bool
) -> tuple[Any, list[tuple[str, str]]]:
    """One agent, one tool it must call first (tool_choice required, reset after the call by
    the SDK's default `reset_tool_choice`); the tool is then withdrawn, so the second model
    call has to answer in text. Returns (result, calls of the tool)."""
    agents = importlib.import_module("agents")
    agents.set_tracing_disabled(True)  # the SDK's tracing would upload to OpenAI
    calls: list[tuple[str, str]] = []

    def not_called_yet(ctx: Any, agent: Any) -> bool:
        return not calls

    @agents.function_tool(is_enabled=not_called_yet)
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather of a city."""
        calls.append((city, unit))
        return fake_weather(city, unit)

    async def go() -> Any:
        client = openai.AsyncOpenAI(
            base_url=server.base_url + "/v1",
            api_key=server.api_key,
            max_retries=0,
            timeout=TIMEOUT_S,
            http_client=recorder.async_client(),
        )
        if responses:
            model = agents.OpenAIResponsesModel(model=model_name, openai_client=client)
            tools = [agents.WebSearchTool(search_context_size="low"), get_weather]
            settings = agents.ModelSettings(
                temperature=0, max_tokens=MAX_TOKENS, tool_choice="get_weather", extra_body=ALWAYS
            )
        else:
            model = agents.OpenAIChatCompletionsModel(model=model_name, openai_client=client)
            tools = [get_weather]
            settings = agents.ModelSettings(
                temperature=0, max_tokens=MAX_TOKENS, tool_choice="required", extra_body=ALWAYS
            )
        agent = agents.Agent(
            name="weather",
            instructions="Answer briefly. Use the weather tool for current weather.",
            model=model,
            tools=tools,
            model_settings=settings,
        )
        try:
            return await agents.Runner.run(agent, WEATHER_QUESTION, max_turns=4)
        finally:
            await client.close()

    return asyncio.run(go()), calls


def test_agents_sdk_chat_completions_tool_then_answer(
    server: RunningServer, model_name: str, recorder: Recorder
) -> None:
    result, calls = agents_run(server, model_name, recorder, responses=False)
    first, second = recorder.chats()  # exactly two model calls: the tool call, the answer
    assert first.request["tool_choice"] == "required"
    args = assert_weather_call(first.response, decision="external")
    assert calls == [(args["city"], args["unit"])]  # the tool ran once, with the model's arguments
    # The SDK reset tool_choice after the call and the tool is withdrawn: the conversation goes
    # on after the tool result, and the loop runs again before the text answer.
    assert "tool_choice" not in second.request and not second.request.get("tools")
    roles = [m["role"] for m in second.request["messages"]]
    assert roles[-2:] == ["assistant", "tool"], roles
    call_id = first.response["choices"][0]["message"]["tool_calls"][0]["id"]
    assert second.request["messages"][-1]["tool_call_id"] == call_id
    choice = assert_self_searched(second.response, decision="external", continuation=True)
    assert choice["finish_reason"] in ("stop", "length") and not choice["message"].get("tool_calls")
    assert isinstance(result.final_output, str) and result.final_output == choice["message"]["content"]


def test_agents_sdk_responses_web_search_and_function_tool(
    server: RunningServer, model_name: str, recorder: Recorder
) -> None:
    """POST /v1/responses with the `web_search` tool (self-search) and a function tool: the
    search runs, then the forced call; after the tool result, the answer."""
    result, calls = agents_run(server, model_name, recorder, responses=True)
    posts = recorder.posts("/responses")
    assert [p.status for p in posts] == [200, 200], [(p.status, p.response) for p in posts]
    first, second = posts
    assert first.request["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert any(t["type"] == "web_search" for t in first.request["tools"]), first.request["tools"]
    output = first.response["output"]
    trace = first.response.get("self_search")
    assert isinstance(trace, dict), first.response
    ran = [s for s in trace["searches"] if s["decision"] != "skipped"]
    assert ran and {s["decision"] for s in ran} == {"external"}, trace  # policy always
    # Each external search is reported as OpenAI reports a web search, before the call.
    searches = [item for item in output if item["type"] == "web_search_call"]
    assert [item["action"]["query"] for item in searches] == [s["query"] for s in ran], output
    function_calls = [item for item in output if item["type"] == "function_call"]
    assert len(function_calls) == 1 and function_calls[0]["name"] == "get_weather", output
    assert output.index(function_calls[0]) > output.index(searches[-1])
    args = json.loads(function_calls[0]["arguments"])
    assert isinstance(args["city"], str) and args["unit"] in UNITS, args
    assert calls == [(args["city"], args["unit"])]  # the tool ran once
    # The conversation goes on with the tool result; the answer is a message.
    results = [item for item in second.request["input"] if item.get("type") == "function_call_output"]
    assert [item["call_id"] for item in results] == [function_calls[0]["call_id"]]
    assert "tool_choice" not in second.request
    assert [t["type"] for t in second.request["tools"]] == ["web_search"]
    messages = [item for item in second.response["output"] if item["type"] == "message"]
    assert len(messages) == 1, second.response["output"]
    assert not [item for item in second.response["output"] if item["type"] == "function_call"]
    assert second.response["self_search"]["searches"], second.response
    assert result.final_output == "".join(part["text"] for part in messages[0]["content"])


# ----- 5. pydantic-ai -----------------------------------------------------------------------


def test_pydantic_ai_tool_then_structured_output(
    server: RunningServer, model_name: str, recorder: Recorder
) -> None:
    pydantic_ai = importlib.import_module("pydantic_ai")
    from pydantic_ai.capabilities import PrepareOutputTools, PrepareTools
    from pydantic_ai.providers.openai import OpenAIProvider

    models_openai = importlib.import_module("pydantic_ai.models.openai")
    model_class = getattr(models_openai, "OpenAIChatModel", None) or models_openai.OpenAIModel
    calls: list[str] = []

    # First the weather tool alone, then the output tool alone: each request offers one tool
    # and (no text output allowed) pydantic-ai requires a call, so each turn is forced.
    def function_tools_until_called(ctx: Any, tool_defs: list[Any]) -> list[Any]:
        return [] if calls else tool_defs

    def output_tools_after_call(ctx: Any, tool_defs: list[Any]) -> list[Any]:
        return tool_defs if calls else []

    async def go() -> Any:
        http_client = recorder.async_client()
        provider = OpenAIProvider(
            base_url=server.base_url + "/v1", api_key=server.api_key, http_client=http_client
        )
        agent = pydantic_ai.Agent(
            model_class(model_name, provider=provider),
            output_type=WeatherReport,
            instructions="Look up the weather, then report it.",
            retries=0,  # a bad answer fails the test instead of hiding behind a retry
            capabilities=[
                PrepareTools(function_tools_until_called),
                PrepareOutputTools(output_tools_after_call),
            ],
            # One call per turn: a 135M model under "required" otherwise repeats its call until
            # the budget runs out (the schema allows any number of parallel calls).
            model_settings={
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
                "extra_body": ALWAYS,
                "parallel_tool_calls": False,
            },
        )

        @agent.tool_plain
        def get_weather(city: str) -> str:
            """Current weather of a city."""
            calls.append(city)
            return fake_weather(city, "celsius")

        try:
            return await agent.run(WEATHER_QUESTION)
        finally:
            await http_client.aclose()

    try:
        result = asyncio.run(go())
    except Exception as exc:  # show what the server answered, not only the library's verdict
        raise AssertionError(f"{exc!r}; responses: {[c.response for c in recorder.chats()]}") from exc
    first, second = recorder.chats()
    assert [t["function"]["name"] for t in first.request["tools"]] == ["get_weather"]
    assert first.request["tool_choice"] in ("required", NAMED_CHOICE), first.request["tool_choice"]
    choice = assert_self_searched(first.response, decision="external")
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert calls == [json.loads(call["function"]["arguments"])["city"]]
    output_tools = [t["function"]["name"] for t in second.request["tools"]]
    assert len(output_tools) == 1 and output_tools != ["get_weather"], output_tools
    assert second.request["messages"][-1]["role"] == "tool"
    choice = assert_self_searched(second.response, decision="external", continuation=True)
    (output_call,) = choice["message"]["tool_calls"]
    assert output_call["function"]["name"] == output_tools[0]
    assert isinstance(result.output, WeatherReport)
    assert result.output == WeatherReport.model_validate_json(output_call["function"]["arguments"])


# ----- 6. instructor ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_response_model(
    sdk: openai.OpenAI, recorder: Recorder, model_name: str, mode: str
) -> None:
    instructor = importlib.import_module("instructor")
    client = instructor.from_openai(sdk, mode=getattr(instructor.Mode, mode))
    fact = client.chat.completions.create(
        model=model_name,
        response_model=CityFact,
        messages=FACT_MESSAGES,
        max_retries=0,
        max_tokens=MAX_TOKENS,
        temperature=0,
        # Self-filled: with the 150-character document inserted, the 135M model tends to copy
        # it into the string value and never close it (a model limit, not instructor's).
        extra_body=NEVER,
    )
    exchange = recorder.only_chat()
    assert isinstance(fact, CityFact)
    if mode == "TOOLS":
        assert exchange.request["tool_choice"] == {"type": "function", "function": {"name": "CityFact"}}
        choice = assert_self_searched(exchange.response, decision="internal")
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "CityFact"
        expected = CityFact.model_validate_json(call["function"]["arguments"])
    else:
        assert sent_json_schema(exchange.request)["name"] == "CityFact"
        expected = assert_fact_json(exchange.response, decision="internal")
    # instructor returns its own subclass of the response model: compare the fields.
    assert fact.model_dump() == expected.model_dump()
