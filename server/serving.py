"""What chat and completions share: request checks, sampling options, logprobs, usage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from router.engine.adapters import Adapter
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
from server.sampling import SamplingDefaults

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
    # --max-request-tokens as set (None: the default, `request_work_cap`'s rule).
    max_request_tokens: int | None = None
    # What a request that sets no temperature / top_p gets (server.sampling).
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # LoRA adapters served beside the base model, by served name (router.engine.adapters).
    adapters: Mapping[str, Adapter] = field(default_factory=dict)
    # The served model's own SSRL profile (prompt, documents, threshold) when it is a known
    # native model (the embedded adapter merged: `--model smollm2-135m-ssrl`), else None.
    base_profile: Adapter | None = None
    # Tokenising and chat templating run here, off the event loop: one worker, as vLLM's
    # own async tokenizer, so that big prompts queue rather than take every core.
    tokenizer_pool: ThreadPoolExecutor = field(default_factory=_tokenizer_pool)

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run CPU-bound prompt work (tokenising, templating) without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, work)

    @property
    def served_names(self) -> list[str]:
        """Every model name requests may send: the base model's, then each adapter's."""
        return [self.model_name, *self.adapters]

    @property
    def max_prompt_chars(self) -> int:
        """More characters than this cannot fit the context whatever the tokenizer does."""
        per_token = getattr(self.engine, "max_chars_per_token", None) or DEFAULT_MAX_CHARS_PER_TOKEN
        return self.engine.max_model_len * per_token

    @property
    def request_work_cap(self) -> int | None:
        """The most tokens of work one request may ask for (`request_work`)."""
        return request_work_cap(self.max_request_tokens, self.max_n, self.engine.max_model_len)


def check_caps(ctx: ServingContext, n: int, max_tokens: int | None, tokens_param: str = "max_tokens") -> None:
    """Server caps (--max-n, --max-tokens-limit), so one request cannot monopolise the engine."""
    enforce_caps(ctx.max_n, ctx.max_tokens_limit, n, max_tokens, tokens_param)


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


# ----- one request's work ------------------------------------------------------------------
#
# What "work" counts. A request makes the engine run sequences: each of its `n` choices (per
# prompt, for completions), each self-search vote of a choice, and each counterfactual branch
# of a trajectory. A sequence's work is the context it holds: its prompt plus every token it may
# generate. The prompt counts once per sequence even where the prefix cache shares its prefill,
# because every sequence attends over all of it at each token it generates. A trajectory's
# later engine calls (the loop stops at each search and resumes: one call per stretch of model
# text, per self-filled <information> and for the answer) re-send what that sequence already
# holds, prompt and transcript, which the prefix cache serves again: they are not counted
# again, although a self-search usage's prompt_tokens bills every call and so may exceed this
# figure several times. The documents a search inserts are not counted either: the request does
# not size them, and the context bounds them with the rest of the sequence.


def request_work(n: int, copies_per_choice: int, prompt_tokens: int, completion_tokens: int) -> int:
    """Tokens of work of a request: `n` choices, each `copies_per_choice` sequences (votes x
    (1 + counterfactual branches)), each holding the prompt and generating up to
    `completion_tokens`. With several prompts (completions), pass the sums over them."""
    return n * copies_per_choice * (prompt_tokens + completion_tokens)


def request_work_cap(max_request_tokens: int | None, max_n: int | None, max_model_len: int) -> int | None:
    """The per-request cap on work. Unset: --max-n x the context, what `n` plain choices can
    use anyway, so only amplification (votes, counterfactual branches) meets the default. Set:
    never below one context, since a single sequence that fits the context is what the context
    rules on, and a request forwarded untokenised (`forwarded_work_bound`) counts a whole one."""
    if max_request_tokens is None:
        return None if max_n is None else max_n * max_model_len
    return max(max_request_tokens, max_model_len)


def work_levers(n: int, votes: int, branches: int, prompts: int, more_completion: bool) -> list[str]:
    """The fields that multiply or make up the work, the one to lower first leading: the
    self-search multipliers (what the cap exists for), then n, then the larger part of a
    sequence. "prompt" stands for the prompt itself (the caller names its field)."""
    levers = []
    if votes > 1:
        levers.append("self_search.votes")
    if branches > 0:
        levers.append("self_search.counterfactual")
    if n > 1:
        levers.append("n")
    parts = ["max_tokens", "prompt"] if more_completion and prompts == 1 else ["prompt", "max_tokens"]
    return [*levers, *parts]


def work_formula(n: int, votes: int, branches: int, prompt: str, completion: str) -> str:
    """The arithmetic as the 400 states it, e.g. `n 16 x votes 8 x (prompt 7,100 + completion 64)`."""
    factors = [f"n {n}"]
    if votes > 1:
        factors.append(f"votes {votes}")
    if branches > 0:
        factors.append(f"(1 + {branches} counterfactual branches)")
    return " x ".join([*factors, f"({prompt} + {completion})"])


def work_error(work: int, cap: int, formula: str, levers: Sequence[str], prompt_param: str) -> APIError:
    """The one 400 of a request over the cap; `param` is the first lever."""
    switch, prompt = "self_search.counterfactual", "prompt"
    fields = [lever for lever in levers if lever not in (switch, prompt)]
    advice = ", ".join(fields[:-1]) + (" or " if len(fields) > 1 else "") + fields[-1]
    if switch in levers:
        advice += f", turn {switch} off"
    if prompt in levers:
        advice += ", or shorten the prompt"
    return APIError(
        400,
        f"This request may use up to {work:,} tokens of work ({formula}); this server allows "
        f"{cap:,} per request (--max-request-tokens). Lower {advice}.",
        param=prompt_param if levers[0] == "prompt" else levers[0],
        code="request_work_exceeded",
    )


def check_request_work(
    cap: int | None,
    n: int,
    prompt_tokens: int,
    completion_tokens: int,
    votes: int = 1,
    branches: int = 0,
    prompts: int = 1,
    prompt_param: str = "messages",
) -> None:
    """Refuse, before any engine work, a request whose work (`request_work`) exceeds `cap`.

    `prompt_tokens` and `completion_tokens` are one sequence's, or with several `prompts`
    (completions) the sums over them; `branches` the counterfactual branches a trajectory
    may add; `prompt_param` the field holding the prompt."""
    work = request_work(n, votes * (1 + branches), prompt_tokens, completion_tokens)
    if cap is None or work <= cap:
        return
    if prompts == 1:
        prompt, completion = f"prompt {prompt_tokens:,}", f"completion {completion_tokens:,}"
    else:
        prompt, completion = f"{prompts} prompts {prompt_tokens:,}", f"completions {completion_tokens:,}"
    formula = work_formula(n, votes, branches, prompt, completion)
    levers = work_levers(n, votes, branches, prompts, completion_tokens >= prompt_tokens)
    raise work_error(work, cap, formula, levers, prompt_param)


def forwarded_work_bound(
    n: int | None, max_tokens: int | None, max_model_len: int, prompt_tokens: int | None = None
) -> int:
    """`request_work` of a request forwarded to vLLM's serving layer, from its JSON body alone.

    Each of its `n` sequences holds the prompt and its completion within the context; the
    prompt is not tokenised before forwarding, and may fill whatever `max_tokens` leaves, so a
    sequence counts a whole context unless the caller knows `prompt_tokens`."""
    if prompt_tokens is None:
        per_sequence = max_model_len
    else:
        per_sequence = min(max_model_len, prompt_tokens + (max_tokens or max_model_len))
    return (n or 1) * per_sequence


def check_forwarded_work(
    cap: int | None,
    n: int | None,
    max_tokens: int | None,
    max_model_len: int,
    tokens_param: str = "max_tokens",
    prompt_tokens: int | None = None,
) -> None:
    """`check_request_work` for a forwarded request (`forwarded_work_bound`): the same 400."""
    work = forwarded_work_bound(n, max_tokens, max_model_len, prompt_tokens)
    if cap is None or work <= cap:
        return
    count = n or 1
    if prompt_tokens is None:
        formula = f"n {count} x (prompt + {tokens_param}, up to the context {max_model_len:,})"
    else:
        completion = min(max_tokens or max_model_len, max_model_len - prompt_tokens)
        formula = work_formula(count, 1, 0, f"prompt {prompt_tokens:,}", f"completion {completion:,}")
    # An untokenised prompt may fill what max_tokens leaves: then only n lowers the bound.
    many = ["n"] if count > 1 else []
    levers = many if prompt_tokens is None and many else [*many, tokens_param, "prompt"]
    raise work_error(work, cap, formula, levers, "prompt")


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


def check_model(ctx: ServingContext, requested: str) -> Adapter | None:
    """The adapter a request names (the base model's profile, None for a model that has none);
    404 for a name this server lacks."""
    if requested == ctx.model_name:
        return ctx.base_profile
    adapter = ctx.adapters.get(requested)
    if adapter is None:
        served = ", ".join(f"`{name}`" for name in ctx.served_names)
        raise APIError(
            404,
            f"The model `{requested}` does not exist. This server serves {served}.",
            param="model",
            code="model_not_found",
        )
    return adapter


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
    request: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    choice: int,
    defaults: SamplingDefaults | None = None,
    adapter: Adapter | None = None,
) -> SamplingOptions:
    # n choices run as n engine requests; a fixed seed is offset per choice so that the
    # choices differ, as they do when vLLM samples n sequences from one seed.
    defaults = defaults or SamplingDefaults()
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=defaults.temperature_for(request.temperature),
        top_p=defaults.top_p_for(request.top_p),
        seed=offset_seed(request.seed, choice),
        stop=request.stop_list(),
        logprobs=logprobs,
        include_stop_str_in_output=False,
        adapter=adapter.lora_name if adapter is not None else None,
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
