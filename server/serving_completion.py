"""`POST /v1/completions`: text in, text out, one choice per prompt and sample."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

from router.engine.base import TokenLogprobs
from server.errors import APIError
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
    completion_budget,
    openai_finish_reason,
    sampling_options,
)
from server.streaming import DONE, merge, sse

logger = logging.getLogger(__name__)

ROUTE = "/v1/completions"


class Completion:
    """One validated completions request: every prompt times n samples."""

    def __init__(self, ctx: ServingContext, request: CompletionRequest) -> None:
        check_model(ctx, request.model)
        check_logprobs(ctx, request.logprobs, "logprobs")
        self.ctx = ctx
        self.request = request
        self.started = time.perf_counter()
        tokenizer = ctx.engine.tokenizer
        self.prompts: list[list[int]] = []
        self.prompt_texts: list[str] = []
        vocab = getattr(ctx.engine, "vocab_size", None)
        for prompt in request.prompts():
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt, add_special_tokens=True)
                text = prompt
            else:
                if vocab is not None and any(t < 0 or t >= vocab for t in prompt):
                    raise APIError(400, f"Token ids must lie in [0, {vocab}).", param="prompt")
                ids, text = list(prompt), tokenizer.decode(prompt)
            if not ids:
                raise APIError(400, "The prompt must not be empty.", param="prompt")
            self.prompts.append(ids)
            self.prompt_texts.append(text)
        self.max_tokens = [completion_budget(ctx, len(p), request.max_tokens) for p in self.prompts]
        ctx.metrics.prompt_tokens.labels(ROUTE).inc(sum(map(len, self.prompts)))

    def _streams(self) -> list[TimedStream]:
        # Choice index = prompt index * n + sample index, as OpenAI numbers them.
        n = self.request.n
        return [
            TimedStream(
                self.ctx,
                ROUTE,
                self.prompts[p],
                sampling_options(self.request, self.max_tokens[p], self.request.logprobs, s),
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
        result = CompletionLogprobs()
        for position in positions:
            token = position.decoded.get(position.token_id) or decode([position.token_id])
            result.tokens.append(token)
            result.token_logprobs.append(position.logprob)
            ranked = sorted(position.top.items(), key=lambda kv: kv[1], reverse=True)
            result.top_logprobs.append(
                {
                    position.decoded.get(tid) or decode([tid]): lp
                    for tid, lp in ranked[: self.request.logprobs]
                }
            )
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def _usage(self, completion_tokens: int) -> Usage:
        return Usage.of(sum(map(len, self.prompts)), completion_tokens)

    async def complete(self) -> CompletionResponse:
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
            model=self.ctx.model_name,
            choices=choices,
            usage=self._usage(sum(len(o.token_ids) for o in outcomes)),
        )

    async def stream(self) -> AsyncIterator[str]:
        chunk_id, created, model = new_id("cmpl"), now(), self.ctx.model_name

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
        except APIError as exc:
            yield sse(exc.body())
        except Exception:
            logger.exception("error while streaming a completion")
            yield sse(APIError(500, "The server had an error while streaming.").body())
        yield DONE
