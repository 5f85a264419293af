"""A self-search request's own tools, output schema and stop strings: how they shape its answer.

The searches of a trajectory run as always; only the final turn (the answer) is shaped:
- `response_format` / `structured_outputs`: the answer is generated under that constraint
  (vLLM's structured outputs), so `content` is valid for the schema.
- `tools` with `tool_choice` "required" or a named function: the answer is generated under the
  JSON schema of the call(s) (vLLM's own rule, `get_json_schema_from_tools`) and is returned as
  `tool_calls` with `finish_reason: "tool_calls"`.
- `tools` with `tool_choice` "auto" (or unset): the answer is free text the configured tool
  parser reads (`--tool-call-parser`; vLLM's `ToolParserManager`); a call it finds becomes
  `tool_calls`, anything else is the answer.
- `stop`: ends the answer (never a query or a self-filled block).

Validation is vLLM's own (its `ChatCompletionRequest`), so a bad tool, tool_choice or schema
gets the 400 vLLM's server would give. Beyond vLLM's checks, a function's name must follow
OpenAI's rule (server.protocol) and a schema that is only a cycle of references is refused
(server.schema_check): the engine would fail on either with a 500. vLLM is imported lazily:
with a remote engine and no local vLLM, a request that sets these fields gets a 400 saying so.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from router.loop import AnswerTurn
from server.errors import APIError, encodable, param_of
from server.protocol import ChatCompletionRequest
from server.schema_check import check_request_schemas
from server.settings import ServeSettings

ToolMode = Literal["none", "named", "required", "auto"]

# The embedded model's template knows no tools: its deployments read calls in the Hermes
# format (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), which the prompt teaches.
EMBEDDED_TOOL_PARSER = "hermes"

# A shaped answer (JSON, a tool call) needs more room than a one-line answer: at least this,
# at most half of the trajectory's budget (the searches keep the other half).
SHAPED_ANSWER_TOKENS = 256

# OpenAI's web_search_options.search_context_size, as documents per search (None: default).
CONTEXT_SIZE_DOCS: dict[str, int | None] = {"low": 1, "medium": None, "high": 5}

_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_outputs")
# The fields that carry a JSON schema, in the order an error names them.
_SCHEMA_FIELDS = ("response_format", "structured_outputs", "tools")


def tool_parser_name(settings: ServeSettings) -> str | None:
    """The tool parser in effect: the operator's, else Hermes for the embedded model."""
    if settings.tool_call_parser:
        return settings.tool_call_parser
    return EMBEDDED_TOOL_PARSER if settings.embedded_weights else None


def auto_tool_choice(settings: ServeSettings) -> bool:
    """Whether tool_choice "auto" is served: the operator's flag, or on for the embedded model."""
    return settings.enable_auto_tool_choice or settings.embedded_weights


@dataclass
class Composition:
    """What the request asks of the answer turn, validated."""

    tool_mode: ToolMode = "none"
    tool_name: str | None = None
    # The request's tools (function definitions), shown to the model when it may call one.
    tools: list[dict[str, Any]] = field(default_factory=list)
    structured: dict[str, Any] | None = None
    stop: tuple[str, ...] = ()
    # vLLM's validated request (what its tool parsers read), when tools are in play.
    vllm_request: Any = None
    # The tool parser that reads an "auto" answer (vLLM's --tool-call-parser name).
    parser: str | None = None

    @property
    def shaped(self) -> bool:
        return self.structured is not None or self.tool_mode != "none"

    def answer_turn(self, budget: int, default_cap: int) -> AnswerTurn:
        """The loop's answer turn for a trajectory of `budget` tokens."""
        cap = None
        if self.shaped:
            cap = max(default_cap, min(SHAPED_ANSWER_TOKENS, budget // 2))
        return AnswerTurn(
            structured=self.structured,
            stop=self.stop,
            max_tokens=cap,
            multiline=self.shaped,
        )

    def tools_prompt(self) -> str:
        """The tools, described for the system prompt (Hermes style), or "" when none apply."""
        if self.tool_mode == "none" or not self.tools:
            return ""
        # Validation keeps lone surrogates out; escaping any that slip through keeps the
        # prompt encodable (the tokenizer and the engine take UTF-8 only).
        listed = encodable("\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools))
        if self.tool_mode == "auto":
            how = (
                'To call one, answer with <tool_call>{"name": <name>, "arguments": <JSON object>}'
                "</tool_call>; otherwise answer in words."
            )
        else:
            how = "Your answer is a call of one of them: a JSON object of its arguments."
        return f"You may call these functions:\n<tools>\n{listed}\n</tools>\n{how}"


def composition_of(request: ChatCompletionRequest, settings: ServeSettings) -> Composition:
    """Validate the request's tools, tool_choice, response_format and structured_outputs with
    vLLM's own protocol, and say how the answer turn is shaped."""
    # As the client sent them (the tools as objects again), for vLLM's protocol to validate.
    sent = request.model_dump(include=set(_FIELDS), exclude_unset=True)
    body = {name: value for name, value in sent.items() if value is not None}
    composition = Composition(stop=request.stop_list())
    if not body:
        return composition
    check_request_schemas(body)
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError as exc:  # remote engine without a local vLLM
        name = next(iter(body))
        raise APIError(
            400,
            f"'{name}' with self-search needs vLLM installed beside the server.",
            param=name,
            code="unsupported_parameter",
        ) from exc
    from pydantic import ValidationError

    try:
        _shape(composition, request, body, settings)
    except RecursionError:
        # vLLM's validation and its tool-schema builder recurse over the schema: too deep a
        # one is the client's error, not the server's.
        where = next((name for name in _SCHEMA_FIELDS if name in body), next(iter(body)))
        raise APIError(
            400, "The JSON schema is nested too deeply.", param=where, code="invalid_value"
        ) from None
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = (error.get("ctx") or {}).get("error")
        param = getattr(cause, "parameter", None) or param_of(p for p in error.get("loc", ()) if p)
        raise APIError(
            400, str(cause or error.get("msg")), param=param or None, code="invalid_value"
        ) from exc
    except (VLLMClientError, ValueError, TypeError) as exc:
        param = getattr(exc, "parameter", None)
        raise APIError(
            400, str(exc), param=param if isinstance(param, str) else None, code="invalid_value"
        ) from exc
    return composition


def _shape(
    composition: Composition, request: ChatCompletionRequest, body: dict[str, Any], settings: ServeSettings
) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest as VLLMChatCompletionRequest,
    )

    vllm_request = VLLMChatCompletionRequest.model_validate(
        {"model": request.model, "messages": [{"role": "user", "content": ""}], **body}
    )
    structured = vllm_request.extract_structured_outputs()
    tools: Any = vllm_request.tools or []
    choice: Any = vllm_request.tool_choice if tools else "none"
    if tools and choice != "none":
        if structured is not None:
            raise APIError(
                400,
                "response_format / structured_outputs cannot be combined with a tool call; "
                'use tool_choice "none" or leave out the schema.',
                param="response_format",
                code="invalid_value",
            )
        composition.tools = [t.model_dump(exclude_none=True) for t in tools]
        composition.vllm_request = vllm_request
        if choice == "auto":
            if not auto_tool_choice(settings) or tool_parser_name(settings) is None:
                raise APIError(
                    400,
                    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                    param="tool_choice",
                    code="invalid_value",
                )
            composition.tool_mode = "auto"
            composition.parser = tool_parser_name(settings)
            return
        from vllm.tool_parsers.utils import get_json_schema_from_tools

        schema = get_json_schema_from_tools(choice, tools, vllm_request.parallel_tool_calls)
        if isinstance(choice, str):
            composition.tool_mode = "required"
        else:
            composition.tool_mode, composition.tool_name = "named", choice.function.name
        # Compact JSON: a small model's free whitespace only costs tokens (and can run on).
        composition.structured = {"json": schema, "disable_any_whitespace": True}
        return
    if structured is not None:
        fields = _structured_fields(structured)
        if ("json" in fields or "json_object" in fields) and "whitespace_pattern" not in fields:
            fields.setdefault("disable_any_whitespace", True)
        composition.structured = fields


def _structured_fields(params: Any) -> dict[str, Any]:
    """vLLM `StructuredOutputsParams` as the set fields the engine interface carries."""
    fields = {
        f.name: getattr(params, f.name) for f in dataclasses.fields(params) if not f.name.startswith("_")
    }
    return {k: v for k, v in fields.items() if v is not None and v is not False}


@dataclass
class ShapedAnswer:
    """The answer turn's text, read as the request asked: content and/or tool calls."""

    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    note: str | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def read_answer(composition: Composition, answer: str, tokenizer: Any) -> ShapedAnswer:
    """What the answer turn produced, as the response carries it."""
    mode = composition.tool_mode
    if mode == "named":
        try:
            json.loads(answer)
        except ValueError:
            # As vLLM's own server: no call and no content (the text is the call's cut JSON).
            return ShapedAnswer(
                None, note="the tool call's arguments are not complete JSON (the budget ran out)"
            )
        assert composition.tool_name is not None
        return ShapedAnswer(None, [_call(composition.tool_name, answer)])
    if mode == "required":
        try:
            calls = json.loads(answer)
            return ShapedAnswer(None, [_call(c["name"], c.get("parameters", {})) for c in calls])
        except (ValueError, TypeError, KeyError):
            return ShapedAnswer(None, note="the tool calls are not complete JSON (the budget ran out)")
    if mode == "auto":
        from vllm.tool_parsers import ToolParserManager

        assert composition.parser is not None
        parser_class = ToolParserManager.get_tool_parser(composition.parser)
        parser = parser_class(tokenizer, composition.vllm_request.tools)
        info = parser.extract_tool_calls(answer, composition.vllm_request)
        if info.tools_called and info.tool_calls:
            calls = [_call(c.function.name, c.function.arguments) for c in info.tool_calls]
            return ShapedAnswer(
                info.content.strip() if info.content and info.content.strip() else None, calls
            )
        # No call: the answer is the protocol's one line.
        return ShapedAnswer(answer.strip().split("\n", 1)[0].strip())
    return ShapedAnswer(answer)
