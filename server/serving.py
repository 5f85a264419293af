"""What chat and completions share: request checks, sampling options, logprobs, usage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from router.engine.base import (
    Engine,
    GenerationDelta,
    SamplingOptions,
    TokenLogprobs,
    offset_seed,
)
from router.engine.guard import generate_or_abort
from server.errors import APIError
from server.metrics import HTTPMetrics
from server.protocol import SamplingFields, TopLogprob

T = TypeVar("T")

# Characters one token may stand for, where the engine does not say (a generous bound: the
# embedded model's longest token is 81 characters).
DEFAULT_MAX_CHARS_PER_TOKEN = 128


def _tokenizer_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssrl-tokenizer")


@dataclass
class ServingContext:
    """What a route needs: the engine, its served name, the metrics and the server's caps."""

    engine: Engine
    model_name: str
    metrics: HTTPMetrics
    max_logprobs: int = 20
    max_n: int | None = None
    max_tokens_limit: int | None = None
    # Tokenising and chat templating run here, off the event loop: one worker, as vLLM's
    # own async tokenizer, so that big prompts queue rather than take every core.
    tokenizer_pool: ThreadPoolExecutor = field(default_factory=_tokenizer_pool)

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run CPU-bound prompt work (tokenising, templating) without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, work)

    @property
    def max_prompt_chars(self) -> int:
        """More characters than this cannot fit the context whatever the tokenizer does."""
        per_token = getattr(self.engine, "max_chars_per_token", None) or DEFAULT_MAX_CHARS_PER_TOKEN
        return self.engine.max_model_len * per_token


def check_caps(ctx: ServingContext, n: int, max_tokens: int | None) -> None:
    """Server caps (--max-n, --max-tokens-limit), so one request cannot monopolise the engine."""
    enforce_caps(ctx.max_n, ctx.max_tokens_limit, n, max_tokens)


def enforce_caps(
    max_n: int | None,
    max_tokens_limit: int | None,
    n: int | None,
    tokens: int | None,
    tokens_param: str = "max_tokens",
) -> None:
    """The caps' one rule and wording, for ssrl's own serving and for requests forwarded to
    vLLM's (which name the token budget `max_completion_tokens` or `max_output_tokens` too)."""
    if max_n is not None and n is not None and n > max_n:
        raise APIError(400, f"n must be at most {max_n} on this server.", param="n", code="invalid_value")
    if max_tokens_limit is not None and tokens is not None and tokens > max_tokens_limit:
        raise APIError(
            400,
            f"{tokens_param} must be at most {max_tokens_limit} on this server.",
            param=tokens_param,
            code="invalid_value",
        )


def check_prompt_chars(ctx: ServingContext, chars: int, param: str) -> None:
    """Refuse, before tokenising it, text too long for the context by its length alone."""
    if chars > ctx.max_prompt_chars:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx.engine.max_model_len} tokens. However, "
            f"your prompt has {chars} characters, more than that many tokens can hold. Please "
            "reduce the length of the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def check_model(ctx: ServingContext, requested: str) -> None:
    if requested != ctx.model_name:
        raise APIError(
            404,
            f"The model `{requested}` does not exist. This server serves `{ctx.model_name}`.",
            param="model",
            code="model_not_found",
        )


def completion_budget(
    ctx: ServingContext,
    prompt_tokens: int,
    requested: int | None,
    default: int | None = None,
    prompt_param: str = "messages",
) -> int:
    """The tokens one choice may generate: the request's `max_tokens` if it fits the context;
    without one, `default` (if any), capped by --max-tokens-limit and by what the context has
    left. The same rule for plain chat, completions and each self-search trajectory."""
    limit = ctx.engine.max_model_len
    if prompt_tokens >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"has {prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        caps = [limit - prompt_tokens, default, ctx.max_tokens_limit]
        return min(c for c in caps if c is not None)
    if prompt_tokens + requested > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} "
            "in the completion). Please reduce the length of the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def sampling_options(
    request: SamplingFields, max_tokens: int, logprobs: int | None, choice: int
) -> SamplingOptions:
    # n choices run as n engine requests; a fixed seed is offset per choice so that the
    # choices differ, as they do when vLLM samples n sequences from one seed.
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=offset_seed(request.seed, choice),
        stop=request.stop_list(),
        logprobs=logprobs,
        include_stop_str_in_output=False,
    )


def check_logprobs(ctx: ServingContext, wanted: int | None, param: str) -> None:
    if wanted is not None and wanted > ctx.max_logprobs:
        raise APIError(
            400,
            f"{param} must be at most {ctx.max_logprobs} on this server (--max-logprobs).",
            param=param,
            code="invalid_value",
        )


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class ChoiceOutcome:
    """One choice's whole generation, gathered from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0

    def add(self, delta: GenerationDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.prompt_token_count is not None:
            self.prompt_tokens = delta.prompt_token_count
        if delta.finish_reason is not None:
            self.finish_reason = openai_finish_reason(delta.finish_reason)


def openai_finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class TimedStream:
    """Engine deltas for one choice, recording time to first token and token counts."""

    def __init__(
        self,
        ctx: ServingContext,
        route: str,
        prompt: Sequence[int],
        options: SamplingOptions,
        started: float,
    ) -> None:
        self.ctx = ctx
        self.route = route
        self.prompt = prompt
        self.options = options
        self.started = started

    async def __aiter__(self) -> AsyncIterator[GenerationDelta]:
        metrics = self.ctx.metrics
        first = True
        generated = 0
        stream = generate_or_abort(
            self.ctx.engine,
            self.prompt,
            self.options,
            new_request_id(),
            on_abort=metrics.engine_aborts.labels(self.route).inc,
        )
        try:
            async for delta in stream:
                if first and delta.token_ids:
                    metrics.ttft.labels(self.route).observe(time.perf_counter() - self.started)
                    first = False
                generated += len(delta.token_ids)
                yield delta
        # Engine errors propagate as they are: `server.errors.api_error_of` maps them, for
        # answers and stream events alike.
        finally:
            await stream.aclose()
            metrics.completion_tokens.labels(self.route).inc(generated)
            metrics.completion_tokens_per_request.labels(self.route).observe(generated)


def top_logprobs_of(position: TokenLogprobs, k: int, decode: Callable[[list[int]], str]) -> list[TopLogprob]:
    ranked = sorted(position.top.items(), key=lambda item: item[1], reverse=True)[:k]
    entries = []
    for token_id, logprob in ranked:
        text = position.decoded.get(token_id) or decode([token_id])
        entries.append(TopLogprob(token=text, logprob=logprob, bytes=list(text.encode())))
    return entries
