"""`POST /v1/chat/completions` without self-search: plain generation, stream or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

from router.engine.base import TokenLogprobs
from server.errors import APIError, error_event
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
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
    top_logprobs_of,
)
from server.streaming import DONE, merge, sse

logger = logging.getLogger(__name__)

ROUTE = "/v1/chat/completions"


async def chat_prompt(ctx: ServingContext, request: ChatCompletionRequest) -> list[int]:
    """Token ids of the conversation under the model's chat template.

    Refused first when its text alone is too long for the context; the template and the
    tokenizer then run off the event loop, so one big prompt stalls no other request.
    """
    try:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.rendered_text()}
            for m in request.messages
        ]
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from exc
    check_prompt_chars(ctx, sum(len(m["content"]) for m in messages), "messages")
    try:
        return await ctx.off_loop(
            lambda: ctx.engine.apply_chat_template(messages, add_generation_prompt=True)
        )
    except Exception as exc:  # jinja errors from a template that rejects this conversation
        raise APIError(400, f"The chat template rejected these messages: {exc}", param="messages") from exc


class PlainChat:
    """One validated chat request, ready to run as n engine requests once `prepare`d."""

    def __init__(self, ctx: ServingContext, request: ChatCompletionRequest) -> None:
        self.adapter = check_model(ctx, request.model)
        top = request.top_logprobs or 0
        check_logprobs(ctx, top if request.logprobs else None, "top_logprobs")
        self.ctx = ctx
        self.request = request
        self.started = time.perf_counter()
        self._prepared = False
        self.prompt: list[int] = []
        self.max_tokens = 0
        self.top_logprobs = top
        self.logprobs = top if request.logprobs else None

    async def prepare(self) -> None:
        """Template and tokenise the prompt (off the event loop) and size the completion."""
        if self._prepared:
            return
        self._prepared = True
        self.prompt = await chat_prompt(self.ctx, self.request)
        self.max_tokens = completion_budget(self.ctx, len(self.prompt), self.request.token_limit)
        # n choices are n engine sequences, each holding the prompt: one cap on their sum.
        check_request_work(self.ctx.request_work_cap, self.request.n, len(self.prompt), self.max_tokens)
        self.ctx.metrics.prompt_tokens.labels(ROUTE).inc(len(self.prompt))

    def _streams(self) -> list[TimedStream]:
        return [
            TimedStream(
                self.ctx,
                ROUTE,
                self.prompt,
                sampling_options(
                    self.request, self.max_tokens, self.logprobs, i, self.ctx.sampling, self.adapter
                ),
                self.started,
            )
            for i in range(self.request.n)
        ]

    def _logprobs(self, positions: Sequence[TokenLogprobs]) -> ChoiceLogprobs | None:
        if self.logprobs is None:
            return None
        decode = self.ctx.engine.tokenizer.decode
        content = []
        for position in positions:
            text = position.decoded.get(position.token_id) or decode([position.token_id])
            content.append(
                TokenLogprob(
                    token=text,
                    logprob=position.logprob,
                    bytes=list(text.encode()),
                    top_logprobs=top_logprobs_of(position, self.top_logprobs, decode),
                )
            )
        return ChoiceLogprobs(content=content)

    async def complete(self) -> ChatCompletionResponse:
        await self.prepare()  # a no-op when the route prepared it already
        outcomes = [ChoiceOutcome() for _ in range(self.request.n)]
        async for index, delta in merge([aiter(s) for s in self._streams()]):
            outcomes[index].add(delta)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=o.text),
                logprobs=self._logprobs(o.logprobs),
                finish_reason=o.finish_reason,
            )
            for i, o in enumerate(outcomes)
        ]
        completion = sum(len(o.token_ids) for o in outcomes)
        return ChatCompletionResponse(
            model=self.request.model, choices=choices, usage=Usage.of(len(self.prompt), completion)
        )

    async def stream(self) -> AsyncIterator[str]:
        await self.prepare()
        chunk_id, created, model = new_id("chatcmpl"), now(), self.request.model

        include_usage = self.request.stream_options is not None and self.request.stream_options.include_usage

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=chunk_id, created=created, model=model, choices=choices, usage=usage
                ).with_usage_field(include_usage)
            )

        completion = 0
        try:
            for i in range(self.request.n):
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for index, delta in merge([aiter(s) for s in self._streams()]):
                completion += len(delta.token_ids)
                if delta.text or delta.logprobs:
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=index,
                                delta=DeltaMessage(content=delta.text),
                                logprobs=self._logprobs(delta.logprobs or ()),
                            )
                        ]
                    )
                if delta.finish_reason is not None:
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=index,
                                delta=DeltaMessage(),
                                finish_reason=openai_finish_reason(delta.finish_reason),
                            )
                        ]
                    )
            options = self.request.stream_options
            if options is not None and options.include_usage:
                yield chunk([], Usage.of(len(self.prompt), completion))
        except Exception as exc:
            yield sse(error_event(exc, "a chat completion"))
        yield DONE
