"""`POST /v1/completions`: text in, text out, one choice per prompt and sample."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from router.engine.base import TokenLogprobs
from server.errors import APIError, error_event
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from server.serving import (
    ChoiceOutcome,
    ServingContext,
    TimedStream,
    check_logprobs,
    check_model,
    check_prompt_chars,
    check_request_work,
    completion_budget,
    openai_finish_reason,
    sampling_options,
)
from server.streaming import DONE, merge, sse

logger = logging.getLogger(__name__)

ROUTE = "/v1/completions"


class Completion:
    """One validated completions request: every prompt times n samples, once `prepare`d."""

    def __init__(self, ctx: ServingContext, request: CompletionRequest) -> None:
        self.adapter = check_model(ctx, request.model)
        check_logprobs(ctx, request.logprobs, "logprobs")
        self.ctx = ctx
        self.request = request
        self.started = time.perf_counter()
        self._prepared = False
        self.prompts: list[list[int]] = []
        self.prompt_texts: list[str] = []
        self.max_tokens: list[int] = []
        vocab = getattr(ctx.engine, "vocab_size", None)
        for prompt in request.prompts():
            if isinstance(prompt, str):
                # Before any tokenising: text too long for the context by its length alone.
                check_prompt_chars(ctx, len(prompt), "prompt")
            else:
                if vocab is not None and any(t < 0 or t >= vocab for t in prompt):
                    raise APIError(400, f"Token ids must lie in [0, {vocab}).", param="prompt")
                completion_budget(ctx, len(prompt), None, prompt_param="prompt")

    def _tokenize(self) -> tuple[list[list[int]], list[str]]:
        """Every prompt as ids and as text (runs on the tokenizer's thread)."""
        tokenizer = self.ctx.engine.tokenizer
        prompts, texts = [], []
        for prompt in self.request.prompts():
            if isinstance(prompt, str):
                ids, text = tokenizer.encode(prompt, add_special_tokens=True), prompt
            else:
                ids, text = list(prompt), tokenizer.decode(prompt)
            prompts.append(ids)
            texts.append(text)
        return prompts, texts

    async def prepare(self) -> None:
        """Tokenise the prompts off the event loop, and size each completion."""
        if self._prepared:
            return
        self._prepared = True
        self.prompts, self.prompt_texts = await self.ctx.off_loop(self._tokenize)
        if any(not ids for ids in self.prompts):
            raise APIError(400, "The prompt must not be empty.", param="prompt")
        self.max_tokens = [
            completion_budget(self.ctx, len(p), self.request.max_tokens, prompt_param="prompt")
            for p in self.prompts
        ]
        # Every prompt runs n sequences, each holding that prompt: one cap on their sum.
        check_request_work(
            self.ctx.request_work_cap,
            self.request.n,
            sum(map(len, self.prompts)),
            sum(self.max_tokens),
            prompts=len(self.prompts),
            prompt_param="prompt",
        )
        self.ctx.metrics.prompt_tokens.labels(ROUTE).inc(sum(map(len, self.prompts)))

    def _streams(self) -> list[TimedStream]:
        # Choice index = prompt index * n + sample index, as OpenAI numbers them.
        n = self.request.n
        return [
            TimedStream(
                self.ctx,
                ROUTE,
                self.prompts[p],
                sampling_options(
                    self.request,
                    self.max_tokens[p],
                    self.request.logprobs,
                    s,
                    self.ctx.sampling,
                    self.adapter,
                ),
                self.started,
            )
            for p in range(len(self.prompts))
            for s in range(n)
        ]

    def _prefix(self, index: int) -> str:
        return self.prompt_texts[index // self.request.n] if self.request.echo else ""

    def _logprobs(self, positions: Sequence[TokenLogprobs], offset: int) -> CompletionLogprobs | None:
        if self.request.logprobs is None:
            return None
        decode = self.ctx.engine.tokenizer.decode
        as_ids = self.request.return_tokens_as_token_ids
        result = CompletionLogprobs()
        for position in positions:
            text = position.decoded.get(position.token_id) or decode([position.token_id])
            result.tokens.append(token_id_placeholder(position.token_id) if as_ids else text)
            result.token_logprobs.append(position.logprob)
            ranked = sorted(position.top.items(), key=lambda kv: kv[1], reverse=True)
            result.top_logprobs.append(
                top_logprobs_keyed(ranked[: self.request.logprobs], position.decoded, decode, as_ids)
            )
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def _usage(self, completion_tokens: int) -> Usage:
        return Usage.of(sum(map(len, self.prompts)), completion_tokens)

    async def complete(self) -> CompletionResponse:
        await self.prepare()  # a no-op when the route prepared it already
        outcomes = [ChoiceOutcome() for _ in range(len(self.prompts) * self.request.n)]
        async for index, delta in merge([aiter(s) for s in self._streams()]):
            outcomes[index].add(delta)
        choices = []
        for i, o in enumerate(outcomes):
            prefix = self._prefix(i)
            choices.append(
                CompletionChoice(
                    index=i,
                    text=prefix + o.text,
                    finish_reason=o.finish_reason,
                    logprobs=self._logprobs(o.logprobs, len(prefix)),
                )
            )
        return CompletionResponse(
            model=self.request.model,
            choices=choices,
            usage=self._usage(sum(len(o.token_ids) for o in outcomes)),
        )

    async def stream(self) -> AsyncIterator[str]:
        await self.prepare()
        chunk_id, created, model = new_id("cmpl"), now(), self.request.model

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(
                CompletionResponse(id=chunk_id, created=created, model=model, choices=choices, usage=usage)
            )

        completion = 0
        offsets = [len(self._prefix(i)) for i in range(len(self.prompts) * self.request.n)]
        try:
            if self.request.echo:
                for i in range(len(offsets)):
                    yield chunk([CompletionChoice(index=i, text=self._prefix(i))])
            async for index, delta in merge([aiter(s) for s in self._streams()]):
                completion += len(delta.token_ids)
                finish = openai_finish_reason(delta.finish_reason) if delta.finish_reason else None
                if delta.text or finish or delta.logprobs:
                    logprobs = self._logprobs(delta.logprobs or (), offsets[index])
                    offsets[index] += len(delta.text)
                    yield chunk(
                        [
                            CompletionChoice(
                                index=index,
                                text=delta.text,
                                finish_reason=finish,
                                logprobs=logprobs,
                            )
                        ]
                    )
            options = self.request.stream_options
            if options is not None and options.include_usage:
                yield chunk([], self._usage(completion))
        except Exception as exc:
            yield sse(error_event(exc, "a completion"))
        yield DONE


def token_id_placeholder(token_id: int) -> str:
    """vLLM's name for a token by id (`return_tokens_as_token_ids`)."""
    return f"token_id:{token_id}"


def top_logprobs_keyed(
    ranked: Sequence[tuple[int, float]],
    decoded: Mapping[int, str],
    decode: Callable[[list[int]], str],
    as_ids: bool,
) -> dict[str, float]:
    """One position's `top_logprobs` dict, one key per candidate token, best first.

    Keys are decoded strings as in vLLM's server, or `token_id:N` with
    `return_tokens_as_token_ids` (vLLM's own way to keep tokens apart). vLLM lets candidates
    whose decoded strings coincide (every partial-byte token of a multi-byte character decodes
    to U+FFFD) overwrite each other; here every candidate whose string is not unique in the
    position is keyed `token_id:N` instead, so none is lost.
    """
    if as_ids:
        return {token_id_placeholder(tid): lp for tid, lp in ranked}
    texts = [(tid, decoded.get(tid) or decode([tid]), lp) for tid, lp in ranked]
    counts = Counter(text for _, text, _ in texts)
    return {(text if counts[text] == 1 else token_id_placeholder(tid)): lp for tid, text, lp in texts}
