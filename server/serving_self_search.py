"""`POST /v1/chat/completions` with self-search: run the loop per choice, report its trace.

What the client gets: `message.content` is the final answer, `message.reasoning` the whole
tagged transcript, `message.annotations` one `url_citation` per external document, and
`choices[i].self_search` the structured trace. Streams carry reasoning deltas, one
`self_search` search event per decided search, answer deltas as content, and the trace
with the choice's finish chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from router.engine.adapters import Adapter
from router.engine.base import offset_seed
from router.loop import LoopConfig, LoopFinished, LoopResult, Mode, SearchDecided, SelfSearchLoop, TextDelta
from router.policies import make_policy
from router.prompts import GUIDED_DOCS_PER_SEARCH, GUIDED_MAX_DOC_CHARS, example_messages
from router.scoring import majority_vote
from router.search.service import SearchService
from router.tags import sanitize_document_text
from server.composition import CONTEXT_SIZE_DOCS, Composition, ShapedAnswer, composition_of, read_answer
from server.errors import APIError, error_event
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeltaMessage,
    SelfSearchOptions,
    Usage,
    new_id,
    now,
)
from server.sampling import SamplingDefaults
from server.search_budget import SearchBudget
from server.serving import (
    ServingContext,
    check_model,
    check_request_work,
    completion_budget,
    new_request_id,
)
from server.serving_chat import ROUTE, chat_prompt
from server.settings import ServeSettings
from server.streaming import DONE, merge, sse

logger = logging.getLogger(__name__)


@dataclass
class SelfSearchRuntime:
    """Server-wide defaults and the search service, made once at start-up."""

    settings: ServeSettings
    search: SearchService
    # The system prompt of each protocol mode (a request may switch modes).
    system_prompts: dict[str, str]
    mode: Mode
    # What a request that sets no temperature / top_p gets (server.sampling).
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # Each key's daily budget of external searches (None: no key has one).
    budget: SearchBudget | None = None


T = TypeVar("T")


def pick(value: T | None, default: T) -> T:
    """The request's value where it set one, else the server's default."""
    return default if value is None else value


def wants_self_search(runtime: SelfSearchRuntime | None, request: ChatCompletionRequest) -> bool:
    if runtime is None:
        return False
    opts = request.self_search
    if opts is not None and opts.enabled is not None:
        if not opts.enabled and request.web_search_options is not None:
            raise APIError(
                400,
                "web_search_options asks for self-search; it cannot be combined with self_search.enabled false.",
                param="web_search_options",
                code="invalid_value",
            )
        return opts.enabled
    # OpenAI's own name for a searching chat switches self-search on.
    return runtime.settings.self_search or request.web_search_options is not None


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=f"self_search.{param}", code="invalid_value")


def _operator_set(settings: Any, name: str) -> bool:
    return name in settings.model_fields_set


def loop_config(
    runtime: SelfSearchRuntime,
    request: ChatCompletionRequest,
    max_tokens: int,
    adapter: Adapter | None = None,
) -> tuple[LoopConfig, int]:
    """The trajectory's config and the number of votes, from server defaults + request.

    An adapter (a LoRA of an SSRL model) self-searches in native mode, with the documents and
    threshold it was made for where the operator did not set them."""
    s = runtime.settings
    o = request.self_search or SelfSearchOptions()
    policy_name = pick(o.policy, s.search_policy)
    aggregate = pick(o.aggregate, s.search_aggregate)
    max_turns = pick(o.max_turns, s.max_turns)
    if max_turns > s.max_turns:
        raise _invalid("max_turns", f"max_turns must be at most {s.max_turns} on this server.")
    votes = pick(o.votes, 1)
    if votes > s.max_votes:
        raise _invalid("votes", f"votes must be at most {s.max_votes} on this server.")
    # The budget policy is a pure top-k rule unless the request also sets a threshold.
    threshold = s.search_threshold
    if (
        adapter is not None
        and adapter.search_threshold is not None
        and not _operator_set(s, "search_threshold")
    ):
        threshold = adapter.search_threshold
    tau = o.threshold if policy_name == "budget" else pick(o.threshold, threshold)
    try:
        policy = make_policy(
            policy_name, tau=tau, aggregate=aggregate, budget=pick(o.budget, s.search_budget)
        )
    except ValueError as exc:
        raise _invalid("policy", str(exc)) from exc
    mode = pick(o.mode, "native" if adapter is not None else runtime.mode)
    # Guided mode (small instruct models) reads one short document far better than three long
    # ones (bench/first_impression.py); a value the operator or the request set still wins.
    docs_default, chars = s.docs_per_search, s.max_doc_chars
    if mode == "guided":
        if "docs_per_search" not in s.model_fields_set:
            docs_default = GUIDED_DOCS_PER_SEARCH
        if "max_doc_chars" not in s.model_fields_set:
            chars = GUIDED_MAX_DOC_CHARS
    if adapter is not None and mode == "native":
        if adapter.docs_per_search is not None and not _operator_set(s, "docs_per_search"):
            docs_default = adapter.docs_per_search
        if adapter.max_doc_chars is not None and not _operator_set(s, "max_doc_chars"):
            chars = adapter.max_doc_chars
    size = request.web_search_options.search_context_size if request.web_search_options else None
    docs_default = CONTEXT_SIZE_DOCS.get(size or "medium") or docs_default
    # Guided mode reads the user's question twice: search context, and the line before <answer>.
    question = _question(request) if mode == "guided" else ""
    # The backend gets the user's question after the model's query where the model was made
    # for it: guided mode, and the embedded native adapter (a 135M model's query alone often
    # finds the wrong article; it was trained on documents found that way).
    with_question = mode == "guided" or (adapter is not None and adapter.search_with_question)
    search_context = _question(request) if with_question and s.search_with_question else ""
    config = LoopConfig(
        mode=mode,
        policy=policy,
        max_turns=max_turns,
        docs_per_search=pick(o.docs_per_search, docs_default),
        max_external_calls=pick(o.max_external_calls, s.max_external_calls),
        logprobs_k=s.entropy_top_k,
        max_doc_chars=chars,
        max_query_tokens=s.max_query_tokens,
        max_information_tokens=s.max_information_tokens,
        max_answer_tokens=s.max_answer_tokens,
        guided_searches=s.guided_searches,
        max_tokens=max_tokens,
        temperature=runtime.sampling.temperature_for(request.temperature),
        top_p=runtime.sampling.top_p_for(request.top_p),
        seed=request.seed,
        counterfactual=bool(o.counterfactual),
        search_context=search_context,
        question=question,
        adapter=adapter.lora_name if adapter is not None else None,
    )
    return config, votes


def _question(request: ChatCompletionRequest) -> str:
    """The user's last message: the context guided searches may send with the query."""
    for message in reversed(request.messages):
        if message.role == "user":
            try:
                return message.text()
            except ValueError:
                return ""
    return ""


def citations(result: LoopResult) -> list[dict[str, Any]]:
    """OpenAI `url_citation` annotations for the external documents, over the answer span."""
    seen: set[str] = set()
    annotations = []
    for record in result.searches:
        for doc in record.documents:
            if doc.url and doc.url not in seen:
                seen.add(doc.url)
                annotations.append(
                    {
                        "type": "url_citation",
                        "url_citation": {
                            "url": doc.url,
                            "title": sanitize_document_text(doc.title),
                            "start_index": 0,
                            "end_index": len(result.answer),
                        },
                    }
                )
    return annotations


@dataclass
class ChoiceResult:
    """One choice: the chosen trajectory and, with votes, all of them."""

    chosen: LoopResult
    samples: list[LoopResult]

    def trace(self) -> dict[str, Any]:
        trace = self.chosen.trace()
        if len(self.samples) > 1:
            vote = majority_vote([r.answer for r in self.samples])
            trace["vote"] = {
                "votes": len(self.samples),
                "winner": vote.index,
                "answer": vote.answer,
                "counts": vote.counts,
                "samples": [{"answer": r.answer, **r.trace()} for r in self.samples],
            }
        return trace

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.samples)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.samples)

    @property
    def reasoning_tokens(self) -> int:
        return sum(r.reasoning_tokens for r in self.samples)


def counterfactual_branches(config: LoopConfig) -> int:
    """The most counterfactual branches one trajectory may run: one per self-filled search
    (router.loop), and branches do not branch. Natively the model searches up to max_turns
    times; guided mode drives min(guided_searches, max_turns) searches."""
    if not config.counterfactual:
        return 0
    if config.mode == "guided":
        return min(config.guided_searches, config.max_turns)
    return config.max_turns


class SelfSearchChat:
    """One validated self-search chat request: n choices, each of `votes` trajectories."""

    def __init__(
        self,
        ctx: ServingContext,
        runtime: SelfSearchRuntime,
        request: ChatCompletionRequest,
        route: str = ROUTE,
        client: bytes | None = None,
    ) -> None:
        self.adapter = check_model(ctx, request.model)
        if request.logprobs:
            raise APIError(
                400,
                "logprobs are not available with self-search; set self_search.enabled "
                "to false for plain generation with logprobs.",
                param="logprobs",
                code="unsupported_parameter",
            )
        self.ctx = ctx
        self.runtime = runtime
        self.request = request
        self.route = route  # the per-route metrics' label: /v1/responses runs this loop too
        self.started = time.perf_counter()
        self._prepared = False
        # A trajectory generates what one plain choice may (`completion_budget`'s rule):
        # max_tokens if given, else --max-loop-tokens, both within --max-tokens-limit.
        requested, default = request.token_limit, runtime.settings.max_loop_tokens
        self.config, self.votes = loop_config(runtime, request, requested or default, self.adapter)
        if runtime.budget is not None and client is not None:
            # Every trajectory of the request (votes, branches) spends from the key's budget.
            self.config = replace(self.config, allowance=runtime.budget.allowance(client))
        # The agent's tools, output schema and stop strings shape the answer turn only.
        self.composition: Composition = composition_of(request, runtime.settings)
        self.protocol_prompt_tokens = 0
        self.prompt: list[int] = []

    async def prepare(self) -> None:
        """Build the protocol's conversation, tokenise it off the event loop, size the loop."""
        if self._prepared:
            return
        self._prepared = True
        request, mode = self.request, self.config.mode
        # The protocol's system prompt comes first; the user's own system text follows it.
        own = [m for m in request.messages if m.role in ("system", "developer")]
        try:
            own_text = [m.text() for m in own]
        except ValueError as exc:  # a non-text content part: the same 400 as plain chat's
            raise APIError(400, str(exc), param="messages", code="invalid_value") from exc
        tools = self.composition.tools_prompt()
        protocol = self.runtime.system_prompts[mode]
        if self.adapter is not None and mode == "native" and self.adapter.system_prompt:
            protocol = self.adapter.system_prompt  # the prompt the adapter was trained with
        system = "\n\n".join([protocol, *own_text, *([tools] if tools else [])])
        examples = [ChatMessage(**m) for m in example_messages(mode)]
        turns = [m for m in request.messages if m.role not in ("system", "developer")]
        conversation = [ChatMessage(role="system", content=system), *examples, *turns]
        self.prompt = await chat_prompt(self.ctx, request.model_copy(update={"messages": conversation}))
        # What the protocol costs: the same conversation without its system prompt and examples.
        own_system = "\n\n".join([*own_text, *([tools] if tools else [])])
        bare = [ChatMessage(role="system", content=own_system)] if own_system else []
        bare_prompt = await chat_prompt(self.ctx, request.model_copy(update={"messages": [*bare, *turns]}))
        self.protocol_prompt_tokens = max(0, len(self.prompt) - len(bare_prompt))
        # Everything a trajectory generates stays in its context: the same rule as plain chat.
        max_tokens = completion_budget(
            self.ctx, len(self.prompt), request.token_limit, default=self.runtime.settings.max_loop_tokens
        )
        answer_turn = self.composition.answer_turn(max_tokens, self.runtime.settings.max_answer_tokens)
        self.config = replace(self.config, max_tokens=max_tokens, answer_turn=answer_turn)
        # Every trajectory (n x votes) and each of its counterfactual branches holds the whole
        # prompt and may generate max_tokens: refuse, before any engine call, more than the cap.
        check_request_work(
            self.ctx.request_work_cap,
            request.n,
            len(self.prompt),
            max_tokens,
            votes=self.votes,
            branches=counterfactual_branches(self.config),
        )
        self.ctx.metrics.prompt_tokens.labels(self.route).inc(len(self.prompt))

    def _loop(self, choice: int, sample: int) -> SelfSearchLoop:
        config = self.config
        if config.seed is not None:
            # Every trajectory differs, reproducibly: its own block of 1000 seeds (the loop
            # offsets each engine call within it), wrapped into the int64 range.
            config = replace(config, seed=offset_seed(config.seed, 1000 * (choice * self.votes + sample)))
        return SelfSearchLoop(
            self.ctx.engine,
            self.runtime.search,
            config,
            self.prompt,
            new_request_id(),
            vocab_size=getattr(self.ctx.engine, "vocab_size", None),
            on_abort=self.ctx.metrics.engine_aborts.labels(self.route).inc,
        )

    async def _run_loop(self, loop: SelfSearchLoop) -> LoopResult:
        async for event in loop.run():
            if isinstance(event, LoopFinished):
                self._record(event.result)
                return event.result
        raise RuntimeError("the loop ended without a result")

    def _record(self, result: LoopResult) -> None:
        metrics = self.ctx.metrics
        metrics.record_trajectory(result.searches)
        metrics.completion_tokens.labels(self.route).inc(result.completion_tokens)

    async def _choice(self, index: int) -> ChoiceResult:
        samples = await asyncio.gather(*(self._run_loop(self._loop(index, s)) for s in range(self.votes)))
        chosen = samples[majority_vote([r.answer for r in samples]).index] if len(samples) > 1 else samples[0]
        return ChoiceResult(chosen, list(samples))

    async def complete(self) -> ChatCompletionResponse:
        await self.prepare()  # a no-op when the route prepared it already
        # Engine errors propagate: `server.errors.api_error_of` maps them, as for streams.
        results = await asyncio.gather(*(self._choice(i) for i in range(self.request.n)))
        choices = []
        for i, r in enumerate(results):
            shaped = self._shaped(r)
            message = AssistantMessage(
                content=shaped.content,
                reasoning=r.chosen.transcript,
                annotations=citations(r.chosen),
                tool_calls=shaped.tool_calls,
            )
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=self._finish_reason(r, shaped),
                    self_search=self._trace(r),
                )
            )
        usage = self._usage(
            sum(r.prompt_tokens for r in results),
            sum(r.completion_tokens for r in results),
            sum(r.reasoning_tokens for r in results),
        )
        return ChatCompletionResponse(model=self.request.model, choices=choices, usage=usage)

    def _shaped(self, result: ChoiceResult) -> ShapedAnswer:
        """The chosen answer as the request's shape reads it (content, or tool calls)."""
        if not self.composition.shaped or not result.chosen.answered:
            return ShapedAnswer(result.chosen.answer)
        shaped = read_answer(self.composition, result.chosen.answer, self.ctx.engine.tokenizer)
        if shaped.note and shaped.note not in result.chosen.notes:
            result.chosen.notes.append(shaped.note)
        return shaped

    def _trace(self, result: ChoiceResult) -> dict[str, Any]:
        """The choice's trace, with the sampling it ran at and whether the server chose it."""
        sampling = {
            "temperature": self.config.temperature,
            "top_p": self.config.top_p,
            "defaults": None
            if self.request.temperature is not None and self.request.top_p is not None
            else self.runtime.sampling.source,
        }
        return {**result.trace(), "sampling": sampling}

    @staticmethod
    def _finish_reason(result: ChoiceResult, shaped: ShapedAnswer) -> str:
        # Parsed tool calls are whole calls (read_answer parses nothing that was cut off), so
        # the answer ended in them even when the budget ran out just after.
        return "tool_calls" if shaped.tool_calls else result.chosen.finish_reason

    def _usage(self, prompt: int, completion: int, reasoning: int) -> Usage:
        usage = Usage.of(prompt, completion)
        usage.protocol_prompt_tokens = self.protocol_prompt_tokens
        # OpenAI's field for tokens the model wrote that are not the answer: the loop's
        # queries, self-filled blocks and (with votes) the samples that lost.
        usage.completion_tokens_details = {"reasoning_tokens": reasoning}
        return usage

    async def _choice_events(self, index: int) -> AsyncIterator[Any]:
        """Events of one choice: live from its loop, or (with votes) the vote's outcome."""
        if self.votes == 1:
            async for event in self._loop(index, 0).run():
                if isinstance(event, LoopFinished):
                    self._record(event.result)
                    yield ChoiceResult(event.result, [event.result])
                else:
                    yield event
            return
        result = await self._choice(index)
        yield TextDelta(result.chosen.transcript, result.chosen.answer)
        yield result

    async def stream(self) -> AsyncIterator[str]:
        await self.prepare()
        chunk_id, created, model = new_id("chatcmpl"), now(), self.request.model
        first_token = True

        include_usage = self.request.stream_options is not None and self.request.stream_options.include_usage

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=chunk_id, created=created, model=model, choices=choices, usage=usage
                ).with_usage_field(include_usage)
            )

        prompt_tokens = completion_tokens = reasoning_tokens = 0
        holds_answer = self.composition.tool_mode != "none"
        try:
            for i in range(self.request.n):
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            streams = [self._choice_events(i) for i in range(self.request.n)]
            async for index, event in merge(streams):
                if isinstance(event, TextDelta):
                    if first_token and event.text:
                        first_token = False
                        self.ctx.metrics.ttft.labels(self.route).observe(time.perf_counter() - self.started)
                    # A tool-using answer is read whole at the end: it may be a call, not content.
                    content = None if holds_answer else event.answer or None
                    if event.text or content:
                        yield chunk(
                            [
                                ChatChunkChoice(
                                    index=index,
                                    delta=DeltaMessage(reasoning=event.text or None, content=content),
                                )
                            ]
                        )
                elif isinstance(event, SearchDecided):
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=index,
                                delta=DeltaMessage(),
                                self_search={"type": "search", "search": event.record.to_dict()},
                            )
                        ]
                    )
                elif isinstance(event, ChoiceResult):
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
                    reasoning_tokens += event.reasoning_tokens
                    shaped = self._shaped(event)
                    if holds_answer and (shaped.content or shaped.tool_calls):
                        calls = [{"index": k, **call} for k, call in enumerate(shaped.tool_calls or [])]
                        delta = DeltaMessage(content=shaped.content or None, tool_calls=calls or None)
                        yield chunk([ChatChunkChoice(index=index, delta=delta)])
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=index,
                                delta=DeltaMessage(),
                                finish_reason=self._finish_reason(event, shaped),
                                annotations=citations(event.chosen) or None,
                                self_search={"type": "trace", **self._trace(event)},
                            )
                        ]
                    )
            options = self.request.stream_options
            if options is not None and options.include_usage:
                yield chunk([], self._usage(prompt_tokens, completion_tokens, reasoning_tokens))
        except Exception as exc:
            yield sse(error_event(exc, "a self-search completion"))
        yield DONE
