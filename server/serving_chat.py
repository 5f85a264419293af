"""`POST /v1/chat/completions` without self-search: plain generation, stream or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

from router.engine.base import TokenLogprobs
from server.errors import APIError
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
    completion_budget,
    openai_finish_reason,
    sampling_options,
    top_logprobs_of,
)
from server.streaming import DONE, merge, sse

logger = logging.getLogger(__name__)

ROUTE = "/v1/chat/completions"


def chat_prompt(ctx: ServingContext, request: ChatCompletionRequest) -> list[int]:
    """Token ids of the conversation under the model's chat template."""
    try:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        return ctx.engine.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from exc
    except Exception as exc:  # jinja errors from a template that rejects this conversation
        raise APIError(400, f"The chat template rejected these messages: {exc}", param="messages") from exc


class PlainChat:
    """One validated chat request, ready to run as n engine requests."""

    def __init__(self, ctx: ServingContext, request: ChatCompletionRequest) -> None:
        check_model(ctx, request.model)
        top = request.top_logprobs or 0
        check_logprobs(ctx, top if request.logprobs else None, "top_logprobs")
        self.ctx = ctx
        self.request = request
        self.started = time.perf_counter()
        self.prompt = chat_prompt(ctx, request)
        self.max_tokens = completion_budget(ctx, len(self.prompt), request.token_limit)
        self.top_logprobs = top
        self.logprobs = top if request.logprobs else None
        ctx.metrics.prompt_tokens.labels(ROUTE).inc(len(self.prompt))

    def _streams(self) -> list[TimedStream]:
        return [
            TimedStream(
                self.ctx,
                ROUTE,
                self.prompt,
                sampling_options(self.request, self.max_tokens, self.logprobs, i),
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
            model=self.ctx.model_name, choices=choices, usage=Usage.of(len(self.prompt), completion)
        )

    async def stream(self) -> AsyncIterator[str]:
        chunk_id, created, model = new_id("chatcmpl"), now(), self.ctx.model_name

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(
                ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices, usage=usage)
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
        except APIError as exc:
            yield sse(exc.body())
        except Exception:
            logger.exception("error while streaming a chat completion")
            yield sse(APIError(500, "The server had an error while streaming.").body())
        yield DONE
