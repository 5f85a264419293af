"""OpenAI wire models for the routes ssrl serves (requests validated, responses built)."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from router.engine.base import SEED_MAX, SEED_MIN
from router.policies import POLICIES, known_policies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _surrogate_at(text: str) -> int | None:
    """Where the first character UTF-8 cannot encode (a lone surrogate) is, else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _lone_surrogate(value: Any) -> str | None:
    """Where the first lone surrogate in a JSON value is, else None: "character 3", or under
    a path ("[1], character 3", "[0].function.description, character 3", "a key of [0]").
    Iterative: a schema or a tool call's arguments may nest as deep as JSON lets them."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            at = _surrogate_at(item)
            if at is not None:
                return f"{path}, character {at}" if path else f"character {at}"
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                if isinstance(key, str) and _surrogate_at(key) is not None:
                    return f"a key of {path or 'the object'}"
                children.append((f"{path}.{key}", child))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(item)]))
    return None


def _encodable(value: Any) -> Any:
    """Text must be valid Unicode: a lone surrogate (JSON allows `"\\ud800"`) cannot be
    encoded as UTF-8, so no tokenizer, stop check, engine or answer could carry it. Checks a
    string, or every string (keys included) of a list or object, however nested (a field
    typed `str | list[str]` is checked as a whole, so an error names the field, not a branch
    of its union)."""
    where = _lone_surrogate(value)
    if where is not None:
        # The message says where, never what: echoing it would be unencodable again.
        raise ValueError(f"text must be valid Unicode; a lone surrogate is at {where}")
    return value


# Every text field of every request model carries this validator: one check for all of them.
Encodable = AfterValidator(_encodable)


class _Request(BaseModel):
    # Like vLLM, fields this server does not know are accepted and ignored.
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Annotated[str, Encodable]
    text: Annotated[str | None, Encodable] = None


class ToolCallFunction(BaseModel):
    name: Annotated[str, Encodable]
    # OpenAI sends the arguments as JSON text; some clients send the object itself.
    arguments: Annotated[str | dict[str, Any], Encodable] = "{}"


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    model_config = ConfigDict(extra="allow")
    id: Annotated[str | None, Encodable] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


# OpenAI's documented rule for a function's name. vLLM's protocol checks none, and a name
# outside it (a lone surrogate, a newline, `</tools>`) would be written into the prompt's
# tools block and the answer's tool calls.
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _function_name(name: str) -> str:
    if not FUNCTION_NAME.fullmatch(name):
        # Never echoed: the name may hold what the answer cannot encode.
        raise ValueError("a function name must be 1 to 64 letters, digits, underscores or dashes")
    return name


FunctionName = Annotated[
    str, AfterValidator(_function_name), WithJsonSchema({"type": "string", "pattern": FUNCTION_NAME_PATTERN})
]


class ToolFunction(BaseModel):
    """A function tool's definition: its name is checked here, the rest by vLLM's protocol."""

    model_config = ConfigDict(extra="allow")
    name: FunctionName
    description: Annotated[str | None, Encodable] = None
    parameters: Annotated[dict[str, Any] | None, Encodable] = None


class ChatTool(BaseModel):
    """A tool of a chat request (vLLM's, as OpenAI's: functions only)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: ToolFunction

    @model_validator(mode="after")
    def _encodable_extras(self) -> ChatTool:
        # Fields beyond the declared ones still reach the prompt's tools block.
        _encodable(self.model_extra)
        _encodable(self.function.model_extra)
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[ContentPart] | None, Encodable] = None
    name: Annotated[str | None, Encodable] = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: Annotated[str | None, Encodable] = None

    def rendered_text(self) -> str:
        """The text the model reads for this message: its text, then each earlier tool call in
        the Hermes format the default tool parser reads (`<tool_call>{...}</tool_call>`), so a
        template that knows no tools still shows the model what it called."""
        text = self.text()
        for call in self.tool_calls or ():
            arguments = call.function.arguments
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    pass  # shown as the client sent it
            payload = json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False)
            text += ("\n" if text else "") + f"<tool_call>\n{payload}\n</tool_call>"
        return text

    def text(self) -> str:
        """The message's text; only text parts are supported."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part type {part.type!r} is not supported; use 'text'")
            texts.append(part.text)
        return "".join(texts)


class SamplingFields(_Request):
    """Sampling fields shared by chat and completions, bounded as OpenAI bounds them."""

    model: Annotated[str, Encodable]
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Annotated[str | list[str] | None, Encodable] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str | None, Encodable] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > 16:
                raise ValueError("at most 16 stop sequences are allowed")
            if any(not s for s in value):
                raise ValueError("stop sequences must not be empty")
        elif value == "":
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class SelfSearchOptions(BaseModel):
    """The `self_search` extension object of a chat request; unset fields take server defaults."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    mode: Literal["native", "guided"] | None = None
    # A built-in name (router.policies.PolicyName) or one an `ssrl.policies` entry point adds.
    # The schema lists the built-ins; the validator also takes the entry points' names.
    policy: Annotated[str, WithJsonSchema({"type": "string", "enum": list(POLICIES)})] | None = None
    threshold: float | None = Field(None, allow_inf_nan=False)
    aggregate: Literal["mean", "max", "min_prob", "ssrl"] | None = None
    max_turns: int | None = Field(None, ge=1)
    docs_per_search: int | None = Field(None, ge=1, le=20)
    max_external_calls: int | None = Field(None, ge=0)
    budget: int | None = Field(None, ge=0)
    votes: int | None = Field(None, ge=1)
    # The routing lab: at each self-filled search also run the externally searched branch from
    # the identical prefix, reported in the trace's `counterfactuals`.
    counterfactual: bool | None = None

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        if value is None or value in POLICIES:
            return value
        known = known_policies()
        if value not in known:
            raise ValueError(f"unknown routing policy {value!r}; expected one of {', '.join(known)}")
        return value


class WebSearchOptions(BaseModel):
    """OpenAI's `web_search_options` on chat: it switches self-search on with the server's
    defaults; `search_context_size` sets the documents per search (low 1, medium the server's
    default, high 5). `user_location` cannot be honoured by the search backends: 400."""

    model_config = ConfigDict(extra="forbid")

    search_context_size: Literal["low", "medium", "high"] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    self_search: SelfSearchOptions | None = None
    web_search_options: WebSearchOptions | None = None
    # The agent's own tools and output schema. With self-search they shape the answer turn
    # (server.composition); vLLM's own protocol validates them there. Plain requests that set
    # them are answered by vLLM's serving layer (server.vllm_serving).
    tools: list[ChatTool] | None = None
    tool_choice: Annotated[str | dict[str, Any] | None, Encodable] = None
    parallel_tool_calls: bool | None = None
    response_format: Annotated[dict[str, Any] | None, Encodable] = None
    structured_outputs: Annotated[dict[str, Any] | None, Encodable] = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def token_limit_param(self) -> str:
        """The field `token_limit` comes from, for errors that name it."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class CompletionRequest(SamplingFields):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], Encodable]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    # vLLM's extension: name tokens "token_id:N" in `tokens` and `top_logprobs` keys.
    return_tokens_as_token_ids: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ----- responses -------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Extension (self-search only): prompt tokens the protocol's system prompt and worked
    # examples add to the conversation, so a user sees what self-search costs.
    protocol_prompt_tokens: int | None = None
    # OpenAI's breakdown; self-search says how many completion tokens were not the answer.
    completion_tokens_details: dict[str, int] | None = None

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "ssrl"
    root: str | None = None
    # vLLM's field: the base model of a LoRA adapter (None for a base model).
    parent: str | None = None
    max_model_len: int | None = None
    # Extension: the temperature and top_p a request that sets none gets, and their source.
    sampling_defaults: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _Response(BaseModel):
    # Extension fields (the self-search trace) ride on the standard objects.
    model_config = ConfigDict(extra="allow")


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning: str | None = None
    annotations: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _content_always(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        # As OpenAI: a message that only calls tools says `"content": null`, even under
        # exclude_none (which keeps unset extension fields out).
        data = handler(self)
        data.setdefault("content", None)
        return data


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None

    @model_serializer(mode="wrap")
    def _openai_nulls(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        # As OpenAI (and vLLM): `logprobs` and `finish_reason` on every chunk, null until
        # known; unset extension fields (self_search, reasoning) stay out under exclude_none.
        data = handler(self)
        data.setdefault("logprobs", None)
        data.setdefault("finish_reason", None)
        return data


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    _null_usage: bool = PrivateAttr(False)

    def with_usage_field(self, include_usage: bool) -> ChatCompletionChunk:
        """With `stream_options.include_usage`, OpenAI sends `usage: null` on every chunk but
        the last (the usage chunk)."""
        self._null_usage = include_usage
        return self

    @model_serializer(mode="wrap")
    def _usage_null(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data = handler(self)
        if self._null_usage:
            data.setdefault("usage", None)
        return data


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ----- the server as a retriever ------------------------------------------------------------


class RetrieveRequest(BaseModel):
    """Search-R1's retriever request (`POST /retrieve`)."""

    model_config = ConfigDict(extra="forbid")

    queries: Annotated[list[str], Encodable] = Field(min_length=1, max_length=256)
    topk: StrictInt | None = Field(None, ge=1, le=100)
    return_scores: bool = False


class SearchHit(BaseModel):
    title: str
    url: str | None = None
    snippet: str
    score: float | None = None
    source: str = ""


class SearchResult(BaseModel):
    object: Literal["search.result"] = "search.result"
    query: str
    backend: str
    latency_s: float
    cache_hit: bool = False
    data: list[SearchHit]


# ----- documented-only shapes (the OpenAPI schema; answers are built elsewhere) --------------


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx/5xx answer and every error event of a stream."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class HealthStatus(BaseModel):
    status: str
    # With --redis-url: whether Redis answers ({"redis": "up"}), else how long it has not.
    shared_state: dict[str, Any] | None = None


class SearchBudgetUsage(BaseModel):
    """`GET /v1/search_budget`: the calling key's budget of external searches today (UTC)."""

    object: Literal["search_budget"] = "search_budget"
    name: str | None = Field(None, description="The key's name in --keys-file, if it has one.")
    limit: int | None = Field(None, description="Searches a day; null: unlimited.")
    used: int = Field(description="Searches counted today (cache hits are not).")
    remaining: int | None = None
    day: str = Field(description="The UTC day counted, YYYY-MM-DD.")
    resets_at: int = Field(description="Unix time of the next UTC midnight.")
    shared: bool = Field(description="Counted in Redis for every replica (false: this replica's own count).")


class RetrieveResponse(BaseModel):
    """Search-R1's retriever answer: per query, its documents (with scores when asked)."""

    result: list[list[dict[str, Any]]]
