"""vLLM's own OpenAI serving layer, in process, for every request that does not self-search.

vLLM's server is its FastAPI app (`build_app`) whose state `init_app_state` fills with its
serving classes (`OpenAIServingChat`, `OpenAIServingCompletion`, `OpenAIServingResponses`,
`ServingTokenization`, `OpenAIServingModels`). ssrl builds exactly that app over its own
in-process `AsyncLLM`, with the arguments vLLM's own CLI parser makes from ssrl's settings,
and hands it the requests it forwards, as an ASGI sub-application, behind ssrl's auth, limits
and metrics. So validation, sampling parameters, tools, structured outputs, streaming and error
answers are vLLM's own, byte for byte. In remote-engine mode the same requests are proxied
unchanged (but for the model name) to the remote vLLM server.

Coupling (vLLM 0.32): `vllm.entrypoints.launchers.cli_args.make_arg_parser`,
`vllm.entrypoints.launchers.app.build_app(args, supported_tasks, model_config)`,
`vllm.entrypoints.launchers.api_server.app_state.init_app_state(engine_client, state, args,
supported_tasks)`, `AsyncLLM.get_supported_tasks()` and the `app.state` attribute names the
routers read. `tests/unit/test_vllm_coupling.py` fails loudly when any of these changes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import SimpleNamespace
from typing import Any, Protocol

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.engine.base import Engine
from server.composition import auto_tool_choice, tool_parser_name
from server.errors import APIError, openai_error_payload
from server.json_body import parse_json_body, parse_json_object
from server.protocol import FUNCTION_NAME
from server.request_fields import check_known_fields, without_openai_only
from server.sampling import SamplingDefaults
from server.schema_check import check_request_schemas
from server.serving import check_forwarded_work, enforce_caps, request_work_cap
from server.settings import ServeSettings

logger = logging.getLogger(__name__)

# Request fields ssrl's self-search loop cannot honour (until the loop composes with them): a
# self-search request carrying any of them answers 400 naming it rather than ignoring it.
# Value: the value that means "not asked for" (sent by some clients), or _ANY when any value is
# refused.
_ANY = object()
SELF_SEARCH_UNSUPPORTED: dict[str, Any] = {
    "tools": _ANY,
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "functions": _ANY,
    "function_call": "none",
    "response_format": {"type": "text"},
    "structured_outputs": _ANY,
    "guided_json": _ANY,
    "guided_regex": _ANY,
    "guided_choice": _ANY,
    "guided_grammar": _ANY,
    "logit_bias": _ANY,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "top_k": _ANY,
    "min_p": 0,
    "min_tokens": 0,
    "ignore_eos": False,
    "bad_words": _ANY,
    "allowed_token_ids": _ANY,
    "prompt_logprobs": _ANY,
    "echo": False,
    "continue_final_message": False,
    "add_generation_prompt": True,
    "chat_template": _ANY,
    "chat_template_kwargs": _ANY,
    "length_penalty": 1,
    "stop_token_ids": _ANY,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": _ANY,
    "prediction": _ANY,
    "reasoning_effort": _ANY,
    "audio": _ANY,
    "modalities": _ANY,
    # vLLM's own extensions: scheduling priority, disaggregated prefill, prefix-cache salt,
    # and free-form arguments for its plugins.
    "priority": 0,
    "kv_transfer_params": _ANY,
    "cache_salt": _ANY,
    "vllm_xargs": _ANY,
    # The rest of vLLM 0.32's request fields (server.request_fields), at their defaults.
    "add_special_tokens": _ANY,  # chat's default is False, completions' True
    "documents": _ANY,
    "ec_transfer_params": _ANY,
    "include_reasoning": True,
    "logprob_token_ids": _ANY,
    "media_io_kwargs": _ANY,
    "mm_payload": "tensors",
    "mm_processor_kwargs": _ANY,
    "prompt_embeds": _ANY,
    "repetition_detection": _ANY,
    "request_id": _ANY,
    "return_mm_kwargs": _ANY,
    "return_prompt_text": _ANY,
    "return_token_ids": _ANY,
    "return_token_offsets": False,
    "return_tokens_as_token_ids": _ANY,
    "routed_experts_prompt_start": 0,
    "session_id": _ANY,
    "stream_interval": _ANY,
    "suffix": _ANY,
    "thinking_token_budget": _ANY,
    "truncation_side": _ANY,
    "use_beam_search": False,
    "watermarking": _ANY,
}


_WHY = {
    "self_search": "is not supported with self-search; set self_search.enabled to false "
    "(or serve with --no-self-search) to use it.",
    "plain": "is not supported by ssrl's own plain serving; serve with --openai-serving auto "
    "(the default) or vllm to use it.",
}


# What ssrl's own Completion honours of that list.
_COMPLETION_HONOURED = frozenset({"echo", "return_tokens_as_token_ids"})

CHAT_ROUTE = "/v1/chat/completions"
COMPLETION_ROUTE = "/v1/completions"


def first_unsupported(body: dict[str, Any], exempt: frozenset[str] = frozenset()) -> str | None:
    """The first field of SELF_SEARCH_UNSUPPORTED the request sets to anything but its neutral
    value, else None."""
    for name, neutral in SELF_SEARCH_UNSUPPORTED.items():
        if name in exempt or name not in body or body[name] is None:
            continue
        if neutral is not _ANY and body[name] == neutral:
            continue
        return name
    return None


def check_unsupported(body: dict[str, Any], why: str, exempt: frozenset[str] = frozenset()) -> None:
    """400 naming the first field of SELF_SEARCH_UNSUPPORTED the request sets: the loop
    (`why="self_search"`) or ssrl's plain serving (`"plain"`) cannot honour it, and nothing is
    silently ignored."""
    name = first_unsupported(body, exempt)
    if name is not None:
        raise APIError(400, f"'{name}' {_WHY[why]}", param=name, code="unsupported_parameter")


# What self-search honours of that list: the agent's tools and output schema shape the answer
# turn (server.composition).
SELF_SEARCH_COMPOSABLE = frozenset(
    {"tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_outputs"}
)


def check_self_search_fields(body: dict[str, Any]) -> None:
    check_unsupported(body, "self_search", exempt=SELF_SEARCH_COMPOSABLE)


# What vLLM's engine can carry: its sampling parameters cross to the engine core as msgpack,
# which refuses an integer outside 64 bits with an empty error that vLLM answers as a 500.
_INT64 = range(-(2**63), 2**63)


def out_of_range_integer(value: Any) -> str | None:
    """The dotted path of the first integer in a JSON value outside the 64-bit range, else None.

    Walked with a stack of its own: a body nested as deep as the JSON parser allows would take
    a recursive walk past Python's recursion limit."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, int) and not isinstance(item, bool) and item not in _INT64:
            return path
        if isinstance(item, dict):
            children = [(f"{path}.{k}" if path else str(k), v) for k, v in item.items()]
        elif isinstance(item, list):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(item)]
        else:
            continue
        pending.extend(reversed(children))  # depth-first, in document order
    return None


def check_forwarded(settings: ServeSettings, body: dict[str, Any], max_model_len: int) -> None:
    """What ssrl checks of any request it hands to vLLM's serving layer: integers the engine
    can carry (400 naming the field, where vLLM would answer 500), ssrl's caps, and the one
    cap on a request's total work (`server.serving.check_forwarded_work`)."""
    where = out_of_range_integer(body)
    if where is not None:
        raise APIError(
            400,
            f"'{where}' is outside the 64-bit integer range this server accepts.",
            param=where,
            code="invalid_value",
        )
    check_tool_names(body)
    check_request_schemas(body)  # a schema that only refers to itself describes no value
    check_caps(settings, body)
    n = _int_or_none(body.get("n"))
    cap = request_work_cap(settings.max_request_tokens, settings.max_n, max_model_len)
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        tokens = _int_or_none(body.get(name))
        if tokens is not None:
            check_forwarded_work(cap, n, tokens, max_model_len, tokens_param=name)
            return
    check_forwarded_work(cap, n, None, max_model_len)


def check_tool_names(body: dict[str, Any]) -> None:
    """OpenAI's rule for a function tool's name (`server.protocol.FUNCTION_NAME`), which ssrl's
    own serving applies and vLLM's does not: chat's `tools[i].function.name`, Responses'
    `tools[i].name`."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        name, param = (
            (function.get("name"), f"tools[{i}].function.name")
            if isinstance(function, dict)
            else (tool.get("name"), f"tools[{i}].name")
        )
        if isinstance(name, str) and not FUNCTION_NAME.fullmatch(name):
            raise APIError(
                400,
                "A function name must be 1 to 64 letters, digits, underscores or dashes.",
                param=param,
                code="invalid_value",
            )


def check_caps(settings: ServeSettings, body: dict[str, Any]) -> None:
    """ssrl's server caps (--max-n, --max-tokens-limit) on a forwarded request."""
    # Only integers are checked: vLLM's own validation answers any other type.
    enforce_caps(settings.max_n, None, _int_or_none(body.get("n")), None)
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        enforce_caps(None, settings.max_tokens_limit, None, _int_or_none(body.get(name)), name)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class OpenAIServing(Protocol):
    """Answers a request as vLLM's OpenAI server would (in process, or the remote one)."""

    # The engine's context, for the work cap of the requests it is handed.
    max_model_len: int

    async def forward(self, request: Request, body: bytes) -> Response: ...

    async def aclose(self) -> None: ...


class _ASGIForward(Response):
    """A response that hands the whole request (its body already read) to another ASGI app."""

    def __init__(self, app: ASGIApp, body: bytes) -> None:
        super().__init__()
        self._app = app
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": self._body, "more_body": False}
            return dict(await receive())  # then the client's disconnect, as it comes

        inner = {k: v for k, v in scope.items() if k not in ("router", "route", "endpoint", "path_params")}
        await self._app(inner, replay, openai_errors(send))


def openai_errors(send: Send) -> Send:
    """A send channel that puts vLLM's JSON error answers in OpenAI's shape (as ssrl's own
    routes answer, `server.errors.openai_error_payload`); everything else passes as it is."""
    held: dict[str, Any] | None = None
    chunks: list[bytes] = []
    event_stream = False

    async def rewriting_send(message: Message) -> None:
        nonlocal held, event_stream
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers") or ()).get(b"content-type", b"")
            event_stream = content_type.startswith(b"text/event-stream")
            if message["status"] >= 400 and content_type.startswith(b"application/json"):
                held = dict(message)
                return
        elif (
            event_stream
            and message["type"] == "http.response.body"
            and b'"error"' in message.get("body", b"")
        ):
            await send({**message, "body": openai_error_events(message["body"])})
            return
        elif held is not None and message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            start, held = held, None
            await _send_json(send, start, openai_error_body(start["status"], b"".join(chunks)))
            return
        await send(message)

    return rewriting_send


def openai_error_events(chunk: bytes) -> bytes:
    """A chunk of a chat or completions event stream with its error events (`data: {"error":
    ...}`, which end a stream that failed after it began) in OpenAI's shape; the status is
    the numeric code vLLM puts in them."""
    lines = chunk.split(b"\n")
    for i, line in enumerate(lines):
        if not line.startswith(b"data: {"):
            continue
        try:
            payload = json.loads(line[len(b"data: ") :])
        except ValueError:
            continue
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            code = error.get("code")
            status = code if isinstance(code, int) and not isinstance(code, bool) else 500
            lines[i] = b"data: " + json.dumps(openai_error_payload(status, payload)).encode()
    return b"\n".join(lines)


def openai_error_body(status: int, body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    return json.dumps(openai_error_payload(status, payload)).encode()


async def _send_json(send: Send, start: dict[str, Any], body: bytes) -> None:
    headers = [(k, v) for k, v in start.get("headers") or () if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def cap_default_max_tokens(model_config: Any, max_tokens_limit: int | None) -> None:
    """Give vLLM's serving layer --max-tokens-limit as its ceiling for every request's budget.

    vLLM's chat, completions and Responses serving take the token budget as the smallest of
    the request's own, what the context has left, and `override_generation_config`'s
    `max_new_tokens` (its `--override-generation-config`). Setting that last one makes an
    omitted `max_tokens` / `max_completion_tokens` / `max_output_tokens` mean what it means on
    ssrl's own serving (`completion_budget`): at most the limit, never more than the context
    has left. An explicit budget over the limit never gets here (`check_caps` answers 400).
    The engine core never reads this; only the serving classes do, when they are built.
    """
    if max_tokens_limit is None:
        return
    override = dict(getattr(model_config, "override_generation_config", None) or {})
    own = override.get("max_new_tokens")
    override["max_new_tokens"] = max_tokens_limit if own is None else min(own, max_tokens_limit)
    model_config.override_generation_config = override


def apply_sampling_defaults(model_config: Any, sampling: SamplingDefaults | None) -> None:
    """Give vLLM's serving layer ssrl's defaults for an omitted temperature / top_p (server.
    sampling), through the same `override_generation_config` its own --generation-config
    options fill: a forwarded request that sets none samples as ssrl's own serving would."""
    if sampling is None:
        return
    override = dict(getattr(model_config, "override_generation_config", None) or {})
    override.update(temperature=sampling.temperature, top_p=sampling.top_p)
    model_config.override_generation_config = override


def vllm_args(settings: ServeSettings, model: str) -> Any:
    """The `Namespace` vLLM's own CLI parser makes for the same model and serving flags."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", model, "--served-model-name", settings.model_name]
    if settings.max_model_len is not None:
        argv += ["--max-model-len", str(settings.max_model_len)]
    # The same tool settings as self-search's answer turn (Hermes by default for the embedded
    # model), so plain and self-search requests read tool calls alike.
    tool_parser = tool_parser_name(settings)
    if auto_tool_choice(settings) and tool_parser is not None:
        argv.append("--enable-auto-tool-choice")
    if tool_parser is not None:
        argv += ["--tool-call-parser", tool_parser]
    if settings.chat_template:
        argv += ["--chat-template", settings.chat_template]
    # The same adapters, in the same order, as the engine (so vLLM's ids match ssrl's): vLLM's
    # layer lists them in /v1/models and answers forwarded requests that name one.
    adapters = settings.adapters()
    if adapters:
        argv += ["--lora-modules", *(f"{a.name}={a.path}" for a in adapters)]
    # vLLM's default (`auto`) constrains a forced or required tool call's envelope only, and
    # its arguments only for tools marked `strict: true`: a 135M model then writes `"Paris"`
    # or a list where the schema asks for an object. ssrl pins every tool's arguments to its
    # `parameters`, as its self-search answer turn does (server.composition), so a forced
    # call validates on every path.
    argv += ["--tool-strict-level", "parameter"]
    parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
    args: Any = parser.parse_args(argv)
    args.api_key = None  # ssrl's AuthMiddleware checks keys before anything is forwarded
    return args


class InProcessServing:
    """vLLM's FastAPI app (its routers, serving classes and error handlers) over ssrl's AsyncLLM."""

    def __init__(self, app: ASGIApp, max_model_len: int) -> None:
        self.app = app
        self.max_model_len = max_model_len

    @classmethod
    async def build(
        cls, async_llm: Any, settings: ServeSettings, model: str, sampling: SamplingDefaults | None = None
    ) -> InProcessServing:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        args = vllm_args(settings, model)
        supported_tasks = await async_llm.get_supported_tasks()
        cap_default_max_tokens(async_llm.model_config, settings.max_tokens_limit)
        apply_sampling_defaults(async_llm.model_config, sampling)
        app = build_app(args, supported_tasks, async_llm.model_config)
        await init_app_state(async_llm, app.state, args, supported_tasks)
        # vLLM's engine-error handler reads `app.state.server` (its uvicorn server, which its
        # launcher sets) to stop a server whose engine died; without it every engine error
        # became a 500 about a missing attribute. ssrl's own lifecycle answers a dead engine
        # (503, /health), so vLLM gets a server object whose exit flag nothing reads.
        app.state.server = SimpleNamespace(should_exit=False)
        return cls(app, async_llm.model_config.max_model_len)

    async def forward(self, request: Request, body: bytes) -> Response:
        return _ASGIForward(self.app, body)

    async def aclose(self) -> None:
        return None


# Per route: the fields that set a request's token budget, and vLLM's default when none is set
# (None: whatever the context has left).
_BUDGET_FIELDS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "/v1/chat/completions": (("max_completion_tokens", "max_tokens"), None),
    "/v1/completions": (("max_tokens",), 16),
    "/v1/responses": (("max_output_tokens",), None),
}


def with_default_budget(path: str, body: dict[str, Any], max_tokens_limit: int | None) -> dict[str, Any]:
    """`body` with --max-tokens-limit as its budget when it sets none and vLLM's default would
    be larger (the remote server's own settings cannot be changed from here); `body` itself
    when nothing changes. In process, `cap_default_max_tokens` does this inside vLLM instead,
    which also keeps the budget within what the context has left."""
    fields, default = _BUDGET_FIELDS.get(path, ((), None))
    if max_tokens_limit is None or not fields:
        return body
    if any(body.get(name) is not None for name in fields):
        return body
    # An explicit null means "no budget" to vLLM, even where its default is a number.
    own_default = None if fields[-1] in body else default
    if own_default is not None and own_default <= max_tokens_limit:
        return body
    return {**body, fields[-1]: max_tokens_limit}


def with_default_sampling(
    path: str, body: dict[str, Any], sampling: SamplingDefaults | None
) -> dict[str, Any]:
    """`body` with ssrl's temperature / top_p where it sets none, for a remote server whose own
    defaults ssrl cannot change (in process, `apply_sampling_defaults`); `body` itself when
    nothing changes. Only defaults that are not OpenAI's neutral ones are written."""
    if sampling is None or sampling.source == "openai" or path not in _BUDGET_FIELDS:
        return body
    missing = {
        k: v
        for k, v in (("temperature", sampling.temperature), ("top_p", sampling.top_p))
        if body.get(k) is None
    }
    return {**body, **missing} if missing else body


_HOP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "host"})


class RemoteServing:
    """The remote vLLM server: requests passed through (the model renamed), answers streamed back."""

    def __init__(
        self,
        root_url: str,
        model: str,
        served_name: str,
        api_key: str | None,
        timeout_s: float,
        max_model_len: int,
        max_tokens_limit: int | None = None,
        sampling: SamplingDefaults | None = None,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.sampling = sampling
        self.served_name = served_name
        self.max_tokens_limit = max_tokens_limit
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=root_url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=5.0)
        )

    def _body(self, path: str, body: bytes) -> bytes:
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return body
        if not isinstance(parsed, dict):
            return body
        changed = with_default_sampling(
            path, with_default_budget(path, parsed, self.max_tokens_limit), self.sampling
        )
        if parsed.get("model") == self.served_name:
            changed = {**changed, "model": self.model}
        return json.dumps(changed).encode() if changed is not parsed else body

    async def forward(self, request: Request, body: bytes) -> Response:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in _HOP and k.lower() != "authorization"
        }
        outgoing = self._client.build_request(
            request.method,
            request.url.path,
            params=request.query_params,
            content=self._body(request.url.path, body) if body else None,
            headers=headers,
        )
        try:
            upstream = await self._client.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            raise APIError(503, "The engine is not available.", code="engine_unavailable") from exc
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        if upstream.status_code >= 400 and upstream.headers.get("content-type", "").startswith(
            "application/json"
        ):
            # An error is small and whole: answered in OpenAI's shape, as in process.
            try:
                body = await upstream.aread()
            finally:
                await upstream.aclose()
            return Response(
                openai_error_body(upstream.status_code, body),
                status_code=upstream.status_code,
                media_type="application/json",
            )
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            headers=kept,
            background=BackgroundTask(upstream.aclose),
        )

    async def aclose(self) -> None:
        await self._client.aclose()


async def build_openai_serving(
    engine: Engine, settings: ServeSettings, sampling: SamplingDefaults | None = None
) -> OpenAIServing | None:
    """vLLM's serving layer for this engine: in process, remote, or none (a test engine)."""
    from router.engine.remote_engine import RemoteEngine

    if isinstance(engine, RemoteEngine):
        root = engine.config.base_url.rstrip("/").removesuffix("/v1")
        return RemoteServing(
            root,
            engine.model,
            settings.model_name,
            engine.config.api_key,
            engine.config.read_timeout_s,
            engine.max_model_len,
            settings.max_tokens_limit,
            sampling,
        )
    async_llm = getattr(engine, "async_llm", None)
    config = getattr(engine, "config", None)
    if async_llm is None or config is None:
        return None
    return await InProcessServing.build(async_llm, settings, config.model, sampling)


ForwardDecision = Callable[[Request, bytes], Awaitable[Response | None]]


def dispatching_route(decide: ForwardDecision) -> type[APIRoute]:
    """A route class whose requests `decide` may answer (forward) before the route's own
    validation runs; when it returns None the route runs as declared."""

    class DispatchingRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def dispatch(request: Request) -> Response:
                forwarded = await decide(request, await request.body())
                return forwarded if forwarded is not None else await handler(request)

            return dispatch

    return DispatchingRoute


def _self_search_wanted(settings: ServeSettings, body: dict[str, Any]) -> bool:
    options = body.get("self_search")
    if isinstance(options, dict) and isinstance(options.get("enabled"), bool):
        return bool(options["enabled"])
    # OpenAI's own name for a searching chat switches self-search on.
    return settings.self_search or body.get("web_search_options") is not None


def chat_decision(settings: ServeSettings, serving: Callable[[], OpenAIServing | None]) -> ForwardDecision:
    """Chat: a self-search request stays with ssrl (400 for a field the loop cannot honour).
    Any other goes to vLLM's serving layer with --openai-serving vllm, and with `auto` when it
    sets a field ssrl's own plain serving cannot honour (tools, response_format, ...)."""
    from pydantic import ValidationError

    from server.protocol import SelfSearchOptions

    async def decide(request: Request, body: bytes) -> Response | None:
        parsed = parse_json_body(body)
        mode = settings.openai_serving
        target = serving() if mode != "ssrl" else None
        if not isinstance(parsed, dict):
            # Not a JSON object: whoever would have answered it reports the error.
            forwards = mode == "vllm" and not settings.self_search and target is not None
            return await target.forward(request, body) if forwards and target is not None else None
        check_known_fields(CHAT_ROUTE, parsed)
        if _self_search_wanted(settings, parsed):
            check_self_search_fields(parsed)
            return None
        if mode == "auto" and first_unsupported(parsed) is None:
            return None  # ssrl's own plain serving honours every field this request sets
        if target is None:
            check_unsupported(parsed, "plain")  # ssrl's PlainChat answers
            return None
        if "self_search" in parsed:
            try:
                SelfSearchOptions.model_validate(parsed["self_search"])
            except ValidationError:
                return None  # ssrl's validation names the bad self_search field
        check_forwarded(settings, parsed, target.max_model_len)
        # ssrl's extension and what is honoured by doing nothing: vLLM would only warn.
        forwarded = without_openai_only({k: v for k, v in parsed.items() if k != "self_search"})
        if forwarded.keys() != parsed.keys():
            body = json.dumps(forwarded).encode()
        return await target.forward(request, body)

    return decide


def completion_decision(
    settings: ServeSettings, serving: Callable[[], OpenAIServing | None]
) -> ForwardDecision:
    """Completions never self-search: vLLM's serving layer answers with --openai-serving vllm,
    and with `auto` when the request sets a field ssrl's own completion serving cannot honour."""

    async def decide(request: Request, body: bytes) -> Response | None:
        mode = settings.openai_serving
        target = serving() if mode != "ssrl" else None
        parsed = parse_json_body(body)
        if isinstance(parsed, dict):
            check_known_fields(COMPLETION_ROUTE, parsed)
        if mode == "auto" and (
            not isinstance(parsed, dict) or first_unsupported(parsed, exempt=_COMPLETION_HONOURED) is None
        ):
            return None  # ssrl's own completion serving honours every field this request sets
        if target is None:
            if isinstance(parsed, dict):
                check_unsupported(parsed, "plain", exempt=_COMPLETION_HONOURED)  # ssrl's Completion
            return None
        if isinstance(parsed, dict):
            check_forwarded(settings, parsed, target.max_model_len)
            forwarded = without_openai_only(parsed)
            if forwarded is not parsed:
                body = json.dumps(forwarded).encode()
        return await target.forward(request, body)

    return decide


async def forward_always(
    serving: OpenAIServing | None, settings: ServeSettings, request: Request
) -> Response:
    """Routes that never self-search (/v1/responses, /tokenize, /detokenize, /version)."""
    if serving is None:
        raise APIError(
            404, "This route needs a vLLM engine (in process or --engine-url).", code="not_available"
        )
    body = await request.body()
    parsed = parse_json_object(body)
    if parsed is not None:
        check_forwarded(settings, parsed, serving.max_model_len)
    return await serving.forward(request, body)
