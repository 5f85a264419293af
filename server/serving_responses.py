"""`POST /v1/responses` with OpenAI's `web_search` tool: ssrl's self-search loop answers it.

A Responses request whose `tools` hold `{"type": "web_search"}` (or `web_search_preview`, or
their dated variants) is converted into a self-search `ChatCompletionRequest`, run by
`SelfSearchChat`, and its result converted back into a Responses object: one
`web_search_call` item per external search, one `reasoning` item per self-filled search
(internal, or an external one that fell back), then the assistant `message` (with
`url_citation` annotations) or one `function_call` item per tool call. Every other
Responses request still goes to vLLM's own `OpenAIServingResponses` (server/app.py).

`stream: true` is answered with OpenAI's Responses stream events once the loop has finished
(the whole answer at once, not token by token). Nothing is silently dropped: a field the
loop cannot honour answers 400 naming it (`param`, code `unsupported_parameter`). `store`
is accepted (clients send it by default) but nothing is stored: the answer says
`store: false`, and `GET /v1/responses/{id}` does not know these ids (vLLM's store, which
answers that route, never sees them).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from server import vllm_serving
from server.composition import CONTEXT_SIZE_DOCS
from server.errors import APIError, param_of
from server.json_body import parse_json_object
from server.protocol import FUNCTION_NAME, ChatCompletionRequest, ChatCompletionResponse
from server.schema_check import check_request_schemas
from server.serving import ServingContext, check_caps
from server.serving_self_search import SelfSearchChat, SelfSearchRuntime

ROUTE = "/v1/responses"  # the label of this route's metrics (tokens, TTFT, engine aborts)

# The tool types that mean "search the web": ssrl's self-search loop.
WEB_SEARCH_TYPES = frozenset(
    {"web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11"}
)
# The hosted-tool `tool_choice` types that force a search (as OpenAI's schema lists them).
_WEB_SEARCH_CHOICES = frozenset({"web_search_preview", "web_search_preview_2025_03_11"})
# `search_context_size` → documents per search (None: the server's default).
# Values of a web_search tool's other fields that ask for nothing the loop does not do.
_WEB_SEARCH_NEUTRAL: dict[str, list[Any]] = {"search_content_types": [["text"]]}
_FUNCTION_TOOL_FIELDS = frozenset({"type", "name", "description", "parameters", "strict"})

# Top-level fields the conversion honours (each handled below).
_HONOURED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "self_search",
        "stream",
        # Accepted, never acted on beyond what the answer says: nothing is stored (`store:
        # false` in the answer); identifiers and hints are echoed.
        "store",
        "metadata",
        "user",
        "safety_identifier",
        "prompt_cache_key",
    }
)
# Fields accepted only with a value that asks for nothing (clients send these defaults).
_NEUTRAL: dict[str, list[Any]] = {
    "stream_options": [{}, {"include_obfuscation": False}],
    "background": [False],
    "truncation": ["disabled"],
    "service_tier": ["auto", "default"],
    "top_logprobs": [0],
    "include": [[], ["web_search_call.action.sources"]],
}

# The chat request's parameter names, as the Responses request calls them.
_CHAT_PARAM = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "tools": "tools",
    "tool_choice": "tool_choice",
    "parallel_tool_calls": "parallel_tool_calls",
}


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _type_of(obj: dict[str, Any]) -> str | None:
    """An object's `type`, when it is a string (sets cannot hold a list or an object)."""
    kind = obj.get("type")
    return kind if isinstance(kind, str) else None


def web_search_tool_index(body: Any) -> int | None:
    """The index of the first web_search tool of a Responses request body, else None."""
    if not isinstance(body, dict):
        return None
    tools = body.get("tools")
    if not isinstance(tools, list):
        return None
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and _type_of(tool) in WEB_SEARCH_TYPES:
            return i
    return None


@dataclass
class ConvertedRequest:
    """A Responses request as the self-search chat request that answers it, and what the
    answer repeats of the request."""

    chat: ChatCompletionRequest
    echo: dict[str, Any] = field(default_factory=dict)
    # `stream: true`: the finished answer is sent as Responses stream events.
    stream: bool = False


# ----- the request -------------------------------------------------------------------------


def _is_neutral(name: str, value: Any) -> bool:
    if name == "reasoning":
        return isinstance(value, dict) and all(v is None for v in value.values())
    if name == "include" and isinstance(value, list):
        return all(v == "web_search_call.action.sources" for v in value)
    return value in _NEUTRAL.get(name, [])


_STRINGS = ("instructions", "user", "safety_identifier", "prompt_cache_key")


def _check_fields(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if value is None:
            continue
        if name in _STRINGS and not isinstance(value, str):
            raise _invalid(name, f"{name} must be a string.")
        if name in ("store", "parallel_tool_calls", "stream") and not isinstance(value, bool):
            raise _invalid(name, f"{name} must be a boolean.")
        if name == "metadata" and not (
            isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        ):
            raise _invalid(name, "metadata must be an object of strings.")
        if name in _HONOURED:
            continue
        if name == "stream_options" and not body.get("stream"):
            raise _invalid(name, "stream_options is only allowed when stream is true.")
        if (name in _NEUTRAL or name == "reasoning") and _is_neutral(name, value):
            continue
        raise _unsupported(
            name,
            f"'{name}' is not supported with the web_search tool (ssrl's self-search); "
            "remove it, or drop the web_search tool to have vLLM's Responses API answer.",
        )


def _text_of(content: Any, param: str) -> str:
    """The text of a message's content: a string or a list of input_text/output_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(param, "content must be a string or a list of input_text parts.")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _invalid(f"{param}[{j}]", "a content part must be an object.")
        kind = part.get("type")
        if kind not in ("input_text", "output_text"):
            raise _unsupported(
                f"{param}[{j}].type",
                f"content part type {kind!r} is not supported with the web_search tool; use 'input_text'.",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _invalid(f"{param}[{j}].text", "text must be a string.")
        texts.append(text)
    return "".join(texts)


_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
# Keys an input item may carry that change nothing (ids and statuses of earlier outputs).
_ITEM_IGNORED = frozenset({"id", "status"})


def _check_item_keys(item: dict[str, Any], allowed: set[str], param: str) -> None:
    for key, value in item.items():
        if key not in allowed and key not in _ITEM_IGNORED and value is not None:
            raise _unsupported(f"{param}.{key}", f"'{key}' is not supported on this input item.")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat conversation of `instructions` + `input`."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list):
        raise _invalid("input", "input must be a string or a list of input items.")
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _invalid(param, "an input item must be an object.")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise _invalid(f"{param}.role", f"role must be one of {', '.join(_MESSAGE_ROLES)}.")
            _check_item_keys(item, {"type", "role", "content"}, param)
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            _check_item_keys(item, {"type", "call_id", "name", "arguments"}, param)
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise _invalid(f"{param}.{key}", f"{key} must be a string.")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            _check_item_keys(item, {"type", "call_id", "output"}, param)
            if not isinstance(item.get("call_id"), str):
                raise _invalid(f"{param}.call_id", "call_id must be a string.")
            output = _text_of(item.get("output"), f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind in ("reasoning", "web_search_call"):
            # Earlier output echoed back as context (as agent frameworks do): chat keeps no
            # earlier reasoning or search either, so the conversation is unchanged without it.
            continue
        else:
            raise _unsupported(
                f"{param}.type", f"input item type {kind!r} is not supported with the web_search tool."
            )
    if not messages:
        raise _invalid("input", "input must hold at least one message.")
    return messages


def _tools(tools: list[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The web_search tool (its index's fields) and the chat's function tools."""
    web_search: dict[str, Any] | None = None
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _invalid(param, "a tool must be an object.")
        kind = _type_of(tool)
        if kind in WEB_SEARCH_TYPES:
            if web_search is not None:
                raise _invalid(param, "at most one web_search tool is allowed.")
            for key, value in tool.items():
                if key in ("type", "search_context_size") or value is None:
                    continue
                if value in _WEB_SEARCH_NEUTRAL.get(key, []):
                    continue
                raise _unsupported(
                    f"{param}.{key}",
                    f"'{key}' of the web_search tool is not supported: ssrl's self-search uses "
                    "the server's configured search backends.",
                )
            size = tool.get("search_context_size")
            if size is not None and (not isinstance(size, str) or size not in CONTEXT_SIZE_DOCS):
                raise _invalid(
                    f"{param}.search_context_size", "search_context_size must be low, medium or high."
                )
            web_search = tool
        elif kind == "function":
            for key, value in tool.items():
                if key not in _FUNCTION_TOOL_FIELDS and value is not None:
                    raise _unsupported(f"{param}.{key}", f"'{key}' of a function tool is not supported.")
            if not isinstance(tool.get("name"), str):
                raise _invalid(f"{param}.name", "a function tool needs a name.")
            if not FUNCTION_NAME.fullmatch(tool["name"]):  # OpenAI's rule, as on chat
                raise _invalid(
                    f"{param}.name", "a function name must be 1 to 64 letters, digits, underscores or dashes."
                )
            function = {
                k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None
            }
            functions.append({"type": "function", "function": function})
        else:
            raise _unsupported(
                f"{param}.type", f"tool type {kind!r} is not supported with the web_search tool."
            )
    assert web_search is not None  # the caller found one
    return web_search, functions


def check_tool_shapes(body: dict[str, Any]) -> None:
    """`tools` a list and `tool_choice` a string or an object whose `type` and `name` are
    strings, in any Responses body: vLLM's Responses validators read these before pydantic
    checks them (`len(tools)`, `tool_choice.name` looked up in a set), so `tools: 3` or a
    list as the name is a TypeError there, a 500."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _invalid("tools", "tools must be a list.")
    choice = body.get("tool_choice")
    if choice is None or isinstance(choice, str):
        return
    if not isinstance(choice, dict):
        raise _invalid("tool_choice", "tool_choice must be a string or an object.")
    for key in ("type", "name"):
        if choice.get(key) is not None and not isinstance(choice[key], str):
            raise _invalid(f"tool_choice.{key}", f"tool_choice.{key} must be a string.")


def _tool_choice(choice: Any, functions: list[dict[str, Any]]) -> tuple[Any, str | None]:
    """The chat's tool_choice (None: leave it out) and the search policy the choice forces."""
    names = {f["function"]["name"] for f in functions}
    if choice is None or choice == "auto":
        return ("auto" if functions else None), None
    if choice == "none":
        return ("none" if functions else None), "never"  # no tool at all, web_search included
    if choice == "required":
        # A tool must be called: with function tools the model picks one (or searches first);
        # with web_search alone, that is a search.
        return ("required", None) if functions else (None, "always")
    if isinstance(choice, dict):
        kind = _type_of(choice)
        if kind in _WEB_SEARCH_CHOICES:
            return ("auto" if functions else None), "always"
        if kind == "function":
            name = choice.get("name")
            if not isinstance(name, str):  # a list or an object cannot be looked up in a set
                raise _invalid("tool_choice.name", "tool_choice.name must be a string.")
            if name not in names:
                raise _invalid("tool_choice.name", f"no function tool named {name!r} in tools.")
            return {"type": "function", "function": {"name": name}}, None
        raise _unsupported(
            "tool_choice.type", f"tool_choice type {kind!r} is not supported with the web_search tool."
        )
    raise _invalid("tool_choice", "tool_choice must be auto, none, required or an object.")


def _response_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        raise _invalid("text", "text must be an object.")
    for key, value in text.items():
        if key == "format" or value is None or (key == "verbosity" and value == "medium"):
            continue
        raise _unsupported(f"text.{key}", f"'text.{key}' is not supported with the web_search tool.")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _invalid("text.format", "text.format must be an object.")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _invalid("text.format", "a json_schema format needs a name and a schema.")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _unsupported("text.format.type", f"text.format type {kind!r} is not supported.")


def _rename(param: str | None) -> str | None:
    """A chat request's parameter path, as the Responses request names it."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    head, bracket, index = head.partition("[")
    return _CHAT_PARAM.get(head, head) + bracket + index + dot + rest


@contextmanager
def responses_params() -> Iterator[None]:
    """Errors of the chat machinery, naming the Responses request's parameters."""
    try:
        yield
    except APIError as exc:
        if exc.param is not None:
            exc.param = _rename(exc.param)
            exc.message = exc.message.replace("max_tokens", "max_output_tokens")
        raise


def to_chat_request(body: dict[str, Any], default_model: str) -> ConvertedRequest:
    """The self-search chat request that answers this web_search Responses request."""
    _check_fields(body)
    web_search, functions = _tools(body["tools"])
    chat: dict[str, Any] = {
        "model": body.get("model") or default_model,
        "messages": _messages(body),
    }
    for name in ("temperature", "top_p", "user"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tool_choice, forced_policy = _tool_choice(body.get("tool_choice"), functions)
    if functions:
        chat["tools"] = functions
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if tool_choice is not None:
        chat["tool_choice"] = tool_choice
    if body.get("text") is not None:
        response_format = _response_format(body["text"])
        if response_format is not None:
            chat["response_format"] = response_format
    options = body.get("self_search")
    if options is not None and not isinstance(options, dict):
        raise _invalid("self_search", "self_search must be an object.")
    options = dict(options or {})
    if options.get("enabled") is False:
        raise _invalid(
            "self_search.enabled",
            "the web_search tool runs self-search; drop the tool instead of disabling self_search.",
        )
    options["enabled"] = True
    if forced_policy is not None:
        if options.get("policy") not in (None, forced_policy):
            raise _invalid(
                "tool_choice",
                f"tool_choice asks for search policy {forced_policy!r}, but self_search.policy is "
                f"{options['policy']!r}.",
            )
        options["policy"] = forced_policy
    # Chat's own name for the tool's size: chat maps it to documents per search (an explicit
    # self_search.docs_per_search, ssrl's own extension, still wins there).
    size = web_search.get("search_context_size")
    if size is not None:
        chat["web_search_options"] = {"search_context_size": size}
    chat["self_search"] = options
    # What self-search chat cannot honour (server.vllm_serving.SELF_SEARCH_UNSUPPORTED) is a
    # 400 here too, naming the Responses parameter.
    refused = vllm_serving.first_unsupported(chat, exempt=vllm_serving.SELF_SEARCH_COMPOSABLE)
    if refused is not None:
        where = _CHAT_PARAM.get(refused, refused)
        raise _unsupported(where, f"'{where}' is not supported with the web_search tool (self-search) yet.")
    try:
        request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = param_of(error.get("loc", ()))
        param = _rename(loc) if loc else None
        raise _invalid(param or "input", f"Invalid value for '{param}': {error.get('msg')}.") from None
    echo = {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body["tools"],
        "user": body.get("user"),
        "safety_identifier": body.get("safety_identifier"),
        "prompt_cache_key": body.get("prompt_cache_key"),
    }
    return ConvertedRequest(chat=request, echo=echo, stream=body.get("stream") is True)


# ----- the answer --------------------------------------------------------------------------


def search_items(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """One output item per search of the trace: `web_search_call` for an external search
    that returned documents, `reasoning` for a self-filled one (internal, or fallen back)."""
    items: list[dict[str, Any]] = []
    for search in trace.get("searches", []):
        decision = search.get("decision")
        query = search.get("query", "")
        if decision == "external" and search.get("fallback") is None:
            urls = dict.fromkeys(d["url"] for d in search.get("documents", []) if d.get("url"))
            sources = [{"type": "url", "url": url} for url in urls]
            items.append(
                {
                    "type": "web_search_call",
                    "id": _new_id("ws"),
                    "status": "completed",
                    "action": {"type": "search", "query": query, "sources": sources},
                }
            )
        elif decision in ("internal", "external"):
            items.append(
                {
                    "type": "reasoning",
                    "id": _new_id("rs"),
                    "summary": [{"type": "summary_text", "text": f"Self-filled search: {query}"}],
                    "content": [{"type": "reasoning_text", "text": search.get("information", "")}],
                }
            )
        # "skipped" (an empty query): no search ran.
    return items


def output_annotations(annotations: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Chat's nested `url_citation` annotations in the Responses' flat shape."""
    out = []
    for annotation in annotations or []:
        citation = annotation.get("url_citation")
        if annotation.get("type") != "url_citation" or not isinstance(citation, dict):
            continue
        out.append(
            {
                "type": "url_citation",
                "url": citation["url"],
                "title": citation.get("title") or "",
                "start_index": citation.get("start_index", 0),
                "end_index": citation.get("end_index", 0),
            }
        )
    return out


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    items = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        items.append(
            {
                "type": "function_call",
                "id": _new_id("fc"),
                "call_id": call.get("id") or _new_id("call"),
                "name": function.get("name", ""),
                "arguments": function.get("arguments", ""),
                "status": "completed",
            }
        )
    return items


def to_response(result: ChatCompletionResponse, converted: ConvertedRequest) -> dict[str, Any]:
    """The Responses object of a self-search chat result (its first choice)."""
    choice = result.choices[0]
    message = choice.message.model_dump(exclude_none=True)
    trace: dict[str, Any] = (choice.model_extra or {}).get("self_search") or {}
    incomplete = choice.finish_reason == "length"
    output = search_items(trace)
    calls = _tool_calls(message)
    content = message.get("content") or ""
    if content or not calls:
        output.append(
            {
                "type": "message",
                "id": _new_id("msg"),
                "role": "assistant",
                "status": "incomplete" if incomplete else "completed",
                "content": [
                    {
                        "type": "output_text",
                        "text": content,
                        "annotations": output_annotations(message.get("annotations")),
                    }
                ],
            }
        )
    output.extend(calls)
    usage = result.usage
    return {
        "id": _new_id("resp"),
        "object": "response",
        "created_at": result.created or int(time.time()),
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "model": result.model,
        "output": output,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,  # nothing is stored: GET /v1/responses/{id} does not know this id
        "truncation": "disabled",
        "background": False,
        **converted.echo,
        "usage": {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {
                "reasoning_tokens": (usage.completion_tokens_details or {}).get("reasoning_tokens", 0)
            },
            "total_tokens": usage.total_tokens,
        },
        "self_search": trace,
    }


# ----- the stream ----------------------------------------------------------------------------


def _started(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as `response.output_item.added` announces it: in progress, empty."""
    if item["type"] == "message":
        return {**item, "status": "in_progress", "content": []}
    if item["type"] == "function_call":
        return {**item, "status": "in_progress", "arguments": ""}
    if item["type"] == "web_search_call":
        return {**item, "status": "in_progress"}
    return {**item, "summary": [], "content": []}


def _item_events(index: int, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The events of one finished output item, from added to done."""
    at = {"output_index": index}
    ids = {"item_id": item["id"], **at}
    yield {"type": "response.output_item.added", **at, "item": _started(item)}
    if item["type"] == "web_search_call":
        for stage in ("in_progress", "searching", "completed"):
            yield {"type": f"response.web_search_call.{stage}", **ids}
    elif item["type"] == "message":
        for c, part in enumerate(item["content"]):
            where = {**ids, "content_index": c}
            yield {
                "type": "response.content_part.added",
                **where,
                "part": {**part, "text": "", "annotations": []},
            }
            if part["text"]:
                yield {"type": "response.output_text.delta", **where, "delta": part["text"], "logprobs": []}
            for a, annotation in enumerate(part["annotations"]):
                yield {
                    "type": "response.output_text.annotation.added",
                    **where,
                    "annotation_index": a,
                    "annotation": annotation,
                }
            yield {"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []}
            yield {"type": "response.content_part.done", **where, "part": part}
    elif item["type"] == "function_call":
        if item["arguments"]:
            yield {"type": "response.function_call_arguments.delta", **ids, "delta": item["arguments"]}
        yield {
            "type": "response.function_call_arguments.done",
            **ids,
            "name": item["name"],
            "arguments": item["arguments"],
        }
    yield {"type": "response.output_item.done", **at, "item": item}


def stream_events(response: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """OpenAI's Responses stream events of a finished response, numbered in order: created,
    in_progress, each output item's events, then completed (or incomplete)."""
    pending = {**response, "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
    ]
    for index, item in enumerate(response["output"]):
        events.extend(_item_events(index, item))
    final = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    events.append({"type": final, "response": response})
    for number, event in enumerate(events):
        yield {**event, "sequence_number": number}


def sse_stream(response: dict[str, Any]) -> Iterator[str]:
    """The stream events as server-sent events (`event:` names the type, as OpenAI's do)."""
    for event in stream_events(response):
        yield f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


# ----- the route's work --------------------------------------------------------------------


class WebSearchResponse:
    """One web_search Responses request, answered by ssrl's self-search chat."""

    def __init__(
        self,
        ctx: ServingContext,
        runtime: SelfSearchRuntime,
        body: dict[str, Any],
        client: bytes | None = None,
    ) -> None:
        self.converted = to_chat_request(body, ctx.model_name)
        chat = self.converted.chat
        with responses_params():
            check_caps(ctx, chat.n, chat.token_limit)
            self.chat = SelfSearchChat(ctx, runtime, chat, route=ROUTE, client=client)

    async def prepare(self) -> None:
        with responses_params():
            await self.chat.prepare()  # tokenising runs off the event loop

    async def complete(self) -> dict[str, Any]:
        with responses_params():
            result = await self.chat.complete()
        return to_response(result, self.converted)

    def http_response(self, response: dict[str, Any]) -> Response:
        """The answer: the Responses object, or (`stream: true`) its stream events. The loop
        has finished by then, so a stream carries the whole answer at once."""
        if self.converted.stream:
            return StreamingResponse(sse_stream(response), media_type="text/event-stream")
        return JSONResponse(response)


def web_search_response(
    ctx: ServingContext, runtime: SelfSearchRuntime | None, raw: bytes, client: bytes | None = None
) -> WebSearchResponse | None:
    """The self-search answer of a `POST /v1/responses` body with a web_search tool; None for
    any other request (vLLM's Responses API answers it, exactly as without this module), once
    what vLLM's own validation would fail on with a 500 has had its 400 here."""
    body = parse_json_object(raw)  # 400 for bytes no route could parse (not UTF-8, too deep)
    if body is None:
        return None
    check_tool_shapes(body)
    check_request_schemas(body)
    if runtime is None or web_search_tool_index(body) is None:
        return None
    return WebSearchResponse(ctx, runtime, body, client)
