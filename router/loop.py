"""The self-search loop: generate, stop at a closed query, decide, insert, resume, answer.

One `SelfSearchLoop` runs one trajectory for one choice. It works on token ids (the chat
prompt plus every token of the transcript so far), so each engine call continues exactly
where the last one stopped and the prefix cache makes the resumption cheap.

Two protocol modes:
- native: the model writes the tags itself (a model trained with SSRL) in one engine request
  (the single pass): the loop reads the stream, decides at each `</search>` from the query's
  logprobs (already in the stream), and either reads on while the model writes its own
  `<information>`, or aborts the request, inserts the search's documents and resumes with a
  new one. Text the engine wrote past an aborted `</search>` never reaches the client.
- guided: for any instruct model; the loop writes each opening tag (`<search>`,
  `<information>`, `<answer>`) and lets the model fill it up to the closing tag, so that
  even a model that ignores the protocol yields a well-formed trace.

`run()` is an async generator of events (text as it is written, each search as soon as it
is decided, and the final result), which serves streaming and non-streaming alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from router.engine.base import Engine, GenerationDelta, SamplingOptions, TokenLogprobs, offset_seed
from router.engine.guard import generate_or_abort
from router.entropy import DEFAULT_ESTIMATOR, QueryEntropy, query_entropy
from router.policies import Decision, Policy, SearchContext
from router.prompts import answer_cue
from router.search.allowance import BUDGET_FALLBACK, BUDGET_NOTE, SearchAllowance
from router.search.base import Document
from router.search.service import SearchService
from router.segments import Segment, continuation_ids, query_positions, token_offsets
from router.tags import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    INFORMATION_CLOSE,
    INFORMATION_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    TAG_NAMES,
    clean_answer,
    close_tag,
    extract_last_answer,
    format_documents,
    open_tag,
    sanitize_document_text,
    sanitize_url,
    strip_tags,
    without_partial_close,
)

Mode = Literal["native", "guided"]

# vLLM's repetition penalty on a guided information fill (1.0: off). Off: vLLM applies it to
# the prompt's tokens too, so at 1.1 the fill avoided "Doc" and the question's own words and
# wrote "Dr. Zorro" instead of a fact (docs/evaluation.md, "First impression").
GUIDED_FILL_REPETITION_PENALTY = 1.0
# vLLM's frequency penalty on a guided answer (output tokens only, so the documents' words stay
# free to copy): a one-line answer must not loop ("2017 2017 2017 ...").
GUIDED_ANSWER_FREQUENCY_PENALTY = 2.0
# None on a guided answer under a JSON schema: the penalty also holds back the quote that
# closes a string, so a small model that loops inside a string value rambles on instead
# (measured: 1.0 turned a repeated phrase into a list of countries, still unclosed).
GUIDED_STRUCTURED_FREQUENCY_PENALTY = 0.0

# How inserted blocks are laid out; SSRL's own loop inserts `\n\n<information>...`.
INFO_PREFIX = "\n\n" + INFORMATION_OPEN
INFO_SUFFIX = INFORMATION_CLOSE + "\n\n"


@dataclass(frozen=True)
class AnswerTurn:
    """What the request asks of the final turn (its own stop strings, response_format or a
    forced tool call): the searches before it stay free, only the answer is shaped."""

    # vLLM `StructuredOutputsParams` fields the answer is generated under (None: free text).
    structured: Mapping[str, Any] | None = None
    # The request's stop strings; they end the answer, never a query or a self-fill.
    stop: tuple[str, ...] = ()
    # Tokens reserved for the answer turn (None: LoopConfig.max_answer_tokens), which searches
    # never eat into; it is also the cap of a one-line answer (a multi-line one may use all that
    # is left).
    max_tokens: int | None = None
    # The answer may span lines (JSON, a tool call); otherwise guided mode stops it at the
    # first newline.
    multiline: bool = False

    @property
    def shaped(self) -> bool:
        """Whether the request shapes the answer at all (native mode then generates the answer
        as a turn of its own instead of inside the model's free text)."""
        return self.structured is not None or bool(self.stop) or self.multiline or self.max_tokens is not None


@dataclass(frozen=True)
class LoopConfig:
    """Everything one trajectory needs to know, resolved from server defaults + request."""

    mode: Mode
    policy: Policy
    max_turns: int = 3
    docs_per_search: int = 3
    max_external_calls: int | None = None
    logprobs_k: int = 20
    # How the query entropy is estimated from the top-k (router.entropy.ESTIMATORS).
    entropy_estimator: str = DEFAULT_ESTIMATOR
    max_doc_chars: int = 600
    max_query_tokens: int = 48
    max_information_tokens: int = 128
    max_answer_tokens: int = 32
    # Guided mode: how many searches to drive before the answer (capped by max_turns).
    guided_searches: int = 1
    # Total tokens the loop may generate across all its engine calls.
    max_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    answer_turn: AnswerTurn = field(default_factory=AnswerTurn)
    # Exact counterfactuals (the routing lab): at each search the policy self-fills, also run
    # the branch that searches externally from the identical prefix (same query, same
    # entropy), and report its outcome beside the trajectory's.
    counterfactual: bool = False
    # Context the search backend gets after the model's query (guided mode: the user's
    # question), so a short query still finds its article; the entropy and the routing
    # decision are the query's alone. "": the query as written.
    search_context: str = ""
    # The user's question (guided mode), written again before `<answer>` when
    # `router.prompts.GUIDED_RESTATE_QUESTION` is on.
    question: str = ""
    # Who pays for external searches (the API key's daily budget): asked before each one,
    # counterfactual branches included; None: searches are not counted.
    allowance: SearchAllowance | None = None
    # The LoRA adapter every engine call of this trajectory runs on (None: the base model).
    adapter: str | None = None

    @property
    def answer_cap(self) -> int:
        """Tokens the answer turn may generate (and that the searches leave free for it)."""
        cap = self.answer_turn.max_tokens
        return self.max_answer_tokens if cap is None else cap


@dataclass
class SearchRecord:
    """One search of a trajectory, as the trace reports it."""

    index: int
    query: str
    entropy: QueryEntropy
    route: Literal["external", "internal", "skipped"]
    reason: str
    policy: str
    backend: str | None = None
    latency_s: float = 0.0
    documents: list[Document] = field(default_factory=list)
    information: str = ""
    # Why an external decision fell back to self-fill (search failed, timed out, ...).
    fallback: str | None = None
    # Failures of backends tried before the one that answered (or all of them), attempts
    # sent to providers, and whether the documents came from the cache.
    errors: list[str] = field(default_factory=list)
    attempts: int = 0
    cache_hit: bool = False
    # What the search backend was sent, where it differs from the query (search_context).
    sent_query: str | None = None

    @property
    def decision(self) -> str:
        return self.route

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "query": self.query,
            "sent_query": self.sent_query,
            "entropy": self.entropy.to_dict(),
            "decision": self.route,
            "reason": self.reason,
            "policy": self.policy,
            "fallback": self.fallback,
            "backend": self.backend,
            "errors": list(self.errors),
            "attempts": self.attempts,
            "cache_hit": self.cache_hit,
            "latency_s": round(self.latency_s, 4),
            # Sanitised as inserted: a client that re-reads the trace never meets a live tag.
            "documents": [
                {
                    "title": sanitize_document_text(d.title),
                    "url": d.url,
                    "snippet": sanitize_document_text(d.text),
                    "score": d.score,
                    "source": d.source,
                }
                for d in self.documents
            ],
            "information": self.information,
        }


@dataclass
class Counterfactual:
    """The branch of a trajectory that searched externally at search `at`, from the identical
    prefix (same query, same entropy) where the trajectory itself self-filled."""

    at: int
    query: str
    # The branch's own search record (documents, backend, fallback) and how it ended.
    search: SearchRecord | None = None
    answer: str = ""
    answered: bool = False
    # The branch's transcript from the branch point on (its `<information>` block onwards).
    transcript: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    # Why no branch was made (the search failed, so it would have self-filled too).
    error: str | None = None
    # Engine requests the branch made (its own, beside the trajectory's).
    engine_requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "query": self.query,
            "answer": self.answer,
            "answered": self.answered,
            "error": self.error,
            "finish_reason": self.finish_reason,
            "completion_tokens": self.completion_tokens,
            "engine_requests": self.engine_requests,
            "search": self.search.to_dict() if self.search is not None else None,
            "transcript": self.transcript,
        }


@dataclass
class LoopResult:
    answer: str
    answered: bool
    transcript: str
    searches: list[SearchRecord]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    notes: list[str] = field(default_factory=list)
    counterfactuals: list[Counterfactual] = field(default_factory=list)
    # Completion tokens of the call that wrote the answer (guided: the answer turn; native:
    # the last free-text call, its thinking included); the rest the model spent on queries,
    # self-filled information and earlier turns, reported as `reasoning_tokens`.
    answer_tokens: int = 0
    # What was taken out of a free-text answer (invented markup, URLs): `tags.clean_answer`.
    removed_from_answer: list[str] = field(default_factory=list)
    # Engine requests the trajectory made (counterfactual branches count their own).
    engine_requests: int = 0

    @property
    def reasoning_tokens(self) -> int:
        return max(0, self.completion_tokens - self.answer_tokens)

    @property
    def external_calls(self) -> int:
        return sum(1 for s in self.searches if s.route == "external" and s.fallback is None)

    @property
    def internal_fills(self) -> int:
        return sum(1 for s in self.searches if s.route == "internal" or s.fallback is not None)

    def trace(self) -> dict[str, Any]:
        return {
            "searches": [s.to_dict() for s in self.searches],
            "external_calls": self.external_calls,
            "internal_fills": self.internal_fills,
            "fallbacks": sum(1 for s in self.searches if s.fallback is not None),
            "turns": len(self.searches),
            "engine_requests": self.engine_requests,
            "answered": self.answered,
            "notes": list(self.notes),
            **({"removed_from_answer": list(self.removed_from_answer)} if self.removed_from_answer else {}),
            **(
                {"counterfactuals": [c.to_dict() for c in self.counterfactuals]}
                if self.counterfactuals
                else {}
            ),
        }


@dataclass(frozen=True)
class TextDelta:
    """Transcript text as it is written; `answer` marks text of the final answer."""

    text: str
    answer: str = ""


@dataclass(frozen=True)
class SearchDecided:
    record: SearchRecord


@dataclass(frozen=True)
class LoopFinished:
    result: LoopResult


LoopEvent = TextDelta | SearchDecided | LoopFinished


class _OutOfBudget(Exception):
    """The trajectory has no tokens (or context) left for another engine call."""


@dataclass
class _Live:
    """An engine request a native trajectory reads on past a cut (the single pass): the
    stream, and what the engine sent beyond the cut that the loop has not read yet."""

    stream: AsyncGenerator[GenerationDelta, None]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Characters past the cut that the cut's last token also carried (`>` and `\n` as one
    # token): text without a token of its own among `token_ids`.
    lead: str = ""
    # Set when the engine had already finished the request.
    finish_reason: str | None = None
    stop_reason: str | None = None

    @property
    def spent(self) -> bool:
        """The engine finished the request at the cut: nothing is left to read (a request
        that ended with the model's `</search>` is resumed by a new one, as stops would)."""
        return self.finish_reason is not None and not (self.text or self.token_ids or self.lead)

    def pending(self) -> GenerationDelta:
        """What was sent past the cut, as one delta (finished if the request was)."""
        return GenerationDelta(
            self.text,
            tuple(self.token_ids),
            tuple(self.logprobs) or None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class SelfSearchLoop:
    def __init__(
        self,
        engine: Engine,
        search: SearchService,
        config: LoopConfig,
        prompt_ids: Sequence[int],
        request_id: str,
        vocab_size: int | None = None,
        on_abort: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.search = search
        self.config = config
        self.request_id = request_id
        self.vocab_size = vocab_size
        self.on_abort = on_abort
        self.ids = list(prompt_ids)
        self.transcript = ""
        self.records: list[SearchRecord] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.notes: list[str] = []
        self._calls = 0
        self._finish_reason = "stop"
        self._answer_tokens = 0
        # Character spans of the transcript holding documents the server inserted: never
        # the answer, never part of the fallback content (they are not the model's words).
        self._inserted: list[tuple[int, int]] = []
        # Tokens an information fill must leave free (guided mode keeps the answer's room).
        self._fill_reserve = 0
        # Counterfactual branches running beside this trajectory (config.counterfactual).
        self._branches: list[asyncio.Task[Counterfactual]] = []
        # Native mode's engine request, read on past its last `</search>` (the single pass).
        self._live: _Live | None = None
        # True while the loop itself aborts a request (not a client leaving: not counted).
        self._cutting = False
        tokenizer = engine.tokenizer
        self._decode: Callable[[Sequence[int]], str] = lambda ids: tokenizer.decode(
            ids, skip_special_tokens=False
        )
        self._encode: Callable[[str], list[int]] = lambda text: tokenizer.encode(
            text, add_special_tokens=False
        )

    # ----- transcript --------------------------------------------------------------

    def _insert(self, text: str) -> TextDelta:
        """Server-written text: the transcript and the prompt ids grow by it."""
        self.transcript += text
        self.ids.extend(self._encode_inserted(text))
        return TextDelta(text)

    def _encode_inserted(self, text: str) -> list[int]:
        """The ids of a server-written piece. A piece ending in newlines is always followed by
        a tag (the loop's in guided mode, the model's own `<answer>` or `<search>` in native
        mode); encode the newlines as they tokenise before that tag (`\n`, `\n`, `<`: what
        the worked examples show and what a model trained on whole transcripts saw), not as
        the lone `\n\n` token a piece encoded alone gets, which such a model never saw before
        a tag (the native adapter then wrote a stray newline, or no `<answer>` at all)."""
        ids = self._encode(text)
        if text.endswith("\n"):
            joined = self._encode(text + "<")
            if joined and self._decode(joined[-1:]) == "<" and self._decode(joined[:-1]) == text:
                return joined[:-1]
        return ids

    def _keep(self, segment: Segment) -> None:
        """Model-written text up to its stop string: keep the engine's own token ids."""
        self.transcript += segment.text
        self.ids.extend(continuation_ids(segment, self._decode, self._encode))

    def _room(self) -> int:
        """What the trajectory has left: completion tokens and context, whichever is less."""
        return min(self.config.max_tokens - self.completion_tokens, self.engine.max_model_len - len(self.ids))

    def _budget(self, cap: int, reserve: int = 0, context_reserve: int = 0) -> int:
        """max_tokens for the next call: its cap, less than what is left minus `reserve`, and
        within the context less `context_reserve` (tokens the loop itself will still insert,
        which take context but are no part of the completion budget)."""
        context_left = self.engine.max_model_len - len(self.ids) - context_reserve
        left = min(cap, self._room() - reserve, context_left - reserve)
        if left <= 0:
            raise _OutOfBudget
        return left

    def _tokens(self, *pieces: str) -> int:
        """Tokens the loop's own insertions of `pieces` take (each is encoded alone, as
        `_insert` does)."""
        return sum(len(self._encode_inserted(p)) for p in pieces)

    def _model_view(self) -> str:
        """The transcript without the documents the server inserted (tags kept)."""
        parts: list[str] = []
        pos = 0
        for start, end in self._inserted:
            parts.append(self.transcript[pos:start])
            pos = end
        parts.append(self.transcript[pos:])
        return "".join(parts)

    async def _generate(
        self,
        stop: tuple[str, ...],
        cap: int,
        logprobs: bool,
        answer: bool = False,
        reserve: int = 0,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        structured: Mapping[str, Any] | None = None,
        context_reserve: int = 0,
        final: bool = False,
        watch: str | None = None,
        resume: bool = False,
    ) -> AsyncIterator[TextDelta | Segment]:
        """One engine call (or, with `resume`, reading on in the live one); yields text as it
        may be shown, then the finished Segment.

        Text that could be the start of a stop string is held back until the engine has
        decided, so streamed text always equals the kept transcript. Only a call whose text
        is (or may be) the answer -- `answer`, or `final` for native mode's free text -- makes
        the trajectory's finish_reason "length" when the budget cuts it: a cut query or
        self-filled block is said in the notes, and the answer after it may be whole.

        `watch`: a string that ends the segment as a stop string would, while the request goes
        on: what the engine sent past it is kept in `self._live` for the next read (or dropped,
        the request aborted, by `_drop_live`). A resumed read stops after `cap` tokens.
        """
        live = self._live if resume else None
        if not resume:
            await self._drop_live()
        segment = Segment()
        read_cap: int | None = None
        if live is None:
            options = SamplingOptions(
                max_tokens=self._budget(cap, reserve, context_reserve),
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                seed=offset_seed(self.config.seed, self._calls),
                stop=stop,
                logprobs=self.config.logprobs_k if logprobs else None,
                include_stop_str_in_output=False,
                repetition_penalty=repetition_penalty,
                frequency_penalty=frequency_penalty,
                structured=structured,
                adapter=self.config.adapter,
            )
            self._calls += 1
            stream = generate_or_abort(
                self.engine, list(self.ids), options, f"{self.request_id}-{self._calls}", self._aborted
            )
            live = _Live(stream)
            source: AsyncIterator[GenerationDelta] = stream
        else:
            # The live request's own max_tokens holds the trajectory's budget; this read holds
            # its cap (and what is left of the trajectory's room).
            self._live = None
            read_cap = max(1, min(cap, self._room() - reserve))
            if live.lead:
                yield self._model_text(live.lead)
            source = _after(live.pending(), live.stream)
            live.text, live.lead, live.token_ids, live.logprobs = "", "", [], []
        ends = (*stop, watch) if watch is not None else stop
        holdback = max((len(s) for s in ends), default=1) - 1
        shown = 0
        answer_shown = ""
        async for delta in source:
            segment.text += delta.text
            segment.token_ids.extend(delta.token_ids)
            if delta.logprobs:
                segment.logprobs.extend(delta.logprobs)
            if delta.prompt_token_count is not None:
                segment.prompt_tokens = delta.prompt_token_count
            if delta.finish_reason is not None:
                segment.finish_reason = delta.finish_reason
                segment.stop = delta.stop_reason
                segment.text = without_partial_close(segment.text, ends)
            done = delta.finish_reason is not None
            if watch is not None and (at := segment.text.find(watch)) >= 0:
                self._live = self._cut(segment, at, at + len(watch), live.stream, delta)
                segment.stop, segment.finish_reason, done = watch, "stop", True
            elif read_cap is not None and not done and len(segment.token_ids) >= read_cap:
                # The read's cap, as a capped engine call would end (the request is aborted).
                # The engine holds back the text that may start a stop string; the tokens
                # are what was read, so the block is their text.
                segment.text = self._decode(segment.token_ids)
                segment.finish_reason, done = "length", True
            end = len(segment.text) if done else max(shown, len(segment.text) - holdback)
            if end > shown:
                piece = segment.text[shown:end]
                shown = end
                answer_piece = ""
                if answer:
                    # The answer is reported stripped; send exactly what the strip keeps.
                    visible = segment.text[:end].strip() if done else segment.text[:end].lstrip().rstrip()
                    answer_piece = visible[len(answer_shown) :]
                    answer_shown = visible
                yield TextDelta(piece, answer_piece)
            if done:
                break
        if self._live is None or self._live.stream is not live.stream:
            # Not read on: close the request (an abort only if the engine had not finished it).
            self._live = live
            await self._drop_live()
        self.prompt_tokens += segment.prompt_tokens
        self.completion_tokens += segment.completion_tokens
        if answer or final:
            # The answer turn adds up (it is one call); a native free-text call replaces the last.
            self._answer_tokens = (self._answer_tokens if answer else 0) + segment.completion_tokens
        if segment.finish_reason == "length":
            if answer or final:
                self._finish_reason = "length"
            else:
                self.notes.append("a search query or self-filled information was cut by the token budget")
        yield segment

    def _cut(
        self,
        segment: Segment,
        start: int,
        end: int,
        stream: AsyncGenerator[GenerationDelta, None],
        last: GenerationDelta,
    ) -> _Live:
        """End `segment` before the watched string at `segment.text[start:end]`; return what
        the engine sent past it (the tokens after the one that ends the string), to read on."""
        spans = token_offsets(segment.token_ids, self._decode)
        kept = next((i + 1 for i, (_, stop) in enumerate(spans) if stop >= end), len(spans))
        reach = spans[kept - 1][1] if kept else end
        rest = _Live(
            stream,
            text=segment.text[max(reach, end) :],
            token_ids=segment.token_ids[kept:],
            logprobs=segment.logprobs[kept:],
            lead=segment.text[end:reach],
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
        )
        segment.text = segment.text[:start]
        del segment.token_ids[kept:]
        del segment.logprobs[kept:]
        return rest

    async def _drop_live(self, deliberate: bool = True) -> None:
        """Abort the live request, if any: what it sent past the last cut is never read (but
        it was generated: it counts in usage). Not `deliberate`: the trajectory is failing
        or its client left, and the abort counts as one."""
        live, self._live = self._live, None
        if live is None:
            return
        self.completion_tokens += len(live.token_ids)
        self._cutting = deliberate
        try:
            await live.stream.aclose()
        finally:
            self._cutting = False

    def _aborted(self) -> None:
        """An engine request left unfinished: counted unless the loop cut it on purpose."""
        if not self._cutting and self.on_abort is not None:
            self.on_abort()

    def _model_text(self, text: str) -> TextDelta:
        """Model-written text whose tokens went to the previous segment (a cut's lead)."""
        self.transcript += text
        self.ids.extend(self._encode(text))
        return TextDelta(text)

    async def _reads_information(self) -> list[TextDelta] | None:
        """After a `</search>` the policy leaves to the model, read on in the live request
        until its next text shows whether it opens `<information>` itself. If it does, keep
        that text (the model's own tags and tokens) and return it to be shown; otherwise
        (another tag, prose, the request ended) drop the request and return None: the caller
        writes the tag and asks for the block, as the stop-based loop does."""
        live = self._live
        if live is None:
            return None
        head = (live.lead + live.text).lstrip()
        while (
            live.finish_reason is None
            and len(head) < len(INFORMATION_OPEN)
            and INFORMATION_OPEN.startswith(head)
        ):
            try:
                delta = await anext(live.stream)
            except StopAsyncIteration:
                break
            live.text += delta.text
            live.token_ids.extend(delta.token_ids)
            live.logprobs.extend(delta.logprobs or ())
            live.finish_reason, live.stop_reason = delta.finish_reason, delta.stop_reason
            head = (live.lead + live.text).lstrip()
        opened = live.text.find(INFORMATION_OPEN)
        ended_at_tag = live.finish_reason is not None and head == INFORMATION_OPEN
        if not head.startswith(INFORMATION_OPEN) or opened < 0 or ended_at_tag:
            await self._drop_live()
            return None
        shown: list[TextDelta] = []
        if live.lead:
            shown.append(self._model_text(live.lead))
        # The opening tag is the model's: keep its tokens, and read on right after it.
        end = opened + len(INFORMATION_OPEN)
        segment = Segment(text=live.text, token_ids=list(live.token_ids), logprobs=list(live.logprobs))
        last = GenerationDelta("", (), finish_reason=live.finish_reason, stop_reason=live.stop_reason)
        self._live = self._cut(segment, end, end, live.stream, last)
        shown.append(TextDelta(segment.text))
        self._keep(segment)
        self.completion_tokens += segment.completion_tokens
        return shown

    # ----- one search ----------------------------------------------------------------

    def _decide(self, entropy: QueryEntropy) -> Decision:
        previous = tuple(r.entropy for r in self.records if r.route != "skipped")
        external = sum(1 for r in self.records if r.route == "external" and r.fallback is None)
        ctx = SearchContext(
            index=len(previous),
            entropy=entropy,
            previous=previous,
            external_calls=external,
            max_external_calls=self.config.max_external_calls,
        )
        return self.config.policy.decide(ctx)

    async def _search_turn(self, segment: Segment, query_start: int) -> AsyncIterator[LoopEvent]:
        """Decide on the query the segment closed, then insert or let the model fill."""
        raw = segment.text[query_start:]
        query = raw.strip()
        start = query_start + (len(raw) - len(raw.lstrip()))
        positions = query_positions(segment, self._decode, start, start + len(query))
        entropy = query_entropy(positions, self.vocab_size, self.config.entropy_estimator)
        index = len(self.records)
        if not query:
            record = SearchRecord(index, "", entropy, "skipped", "empty query", self.config.policy.name)
            self.records.append(record)
            yield SearchDecided(record)
            return
        decision = self._decide(entropy)
        record = SearchRecord(index, query, entropy, decision.route, decision.reason, decision.policy)
        if decision.route == "external":
            # The request would write past `</search>` for nothing while the API answers:
            # abort it at once (a failed search then self-fills in a request of its own).
            await self._drop_live()
            await self._search_into(record)
        self.records.append(record)
        if self.config.counterfactual and record.route == "internal":
            self._branches.append(asyncio.ensure_future(self._branch(self._fork(record), record)))
        yield SearchDecided(record)
        if record.route == "external" and record.fallback is None:
            for delta in self._insert_documents(record):
                yield delta
            return
        # The single pass: the model writes its own block in the request it is writing.
        own = await self._reads_information()
        if own is not None:
            for delta in own:
                yield delta
            async for event in self._read_information(record):
                yield event
            return
        yield self._insert(INFO_PREFIX)
        async for item in self._generate(
            (INFORMATION_CLOSE,),
            self.config.max_information_tokens,
            False,
            reserve=self._fill_reserve,
            # Guided mode: a small model filling a block alone drifts into loops.
            repetition_penalty=GUIDED_FILL_REPETITION_PENALTY if self.config.mode == "guided" else 1.0,
        ):
            if isinstance(item, Segment):
                self._keep(item)
                record.information = item.text.strip()
            else:
                yield item
        yield self._insert(INFO_SUFFIX)

    async def _read_information(self, record: SearchRecord) -> AsyncIterator[LoopEvent]:
        """Read the block the model is writing in the live request, up to its `</information>`;
        a block the budget cuts or the request ends is closed by the loop, and a new request
        resumes after it."""
        start = len(self.transcript)
        segment: Segment | None = None
        async for item in self._generate(
            (), self.config.max_information_tokens, False, watch=INFORMATION_CLOSE, resume=True
        ):
            if isinstance(item, Segment):
                segment = item
            else:
                yield item
        assert segment is not None
        self._keep(segment)
        record.information = self.transcript[start:].strip()
        if segment.stop == INFORMATION_CLOSE:
            yield self._insert(INFORMATION_CLOSE)
            return
        await self._drop_live()
        yield self._insert(INFO_SUFFIX)

    async def _search_into(self, record: SearchRecord) -> None:
        """Call the search service for `record`'s query; a failure marks its fallback."""
        context = self.config.search_context.strip()
        sent = f"{record.query} {context}" if context and context not in record.query else record.query
        record.sent_query = sent if sent != record.query else None
        allowance = self.config.allowance
        if allowance is not None and not await allowance.take():
            # The key's budget is spent: the model fills the information, the request goes on.
            record.fallback = BUDGET_FALLBACK
            if BUDGET_NOTE not in self.notes:
                self.notes.append(BUDGET_NOTE)
            return
        outcome = await self.search.search(sent, self.config.docs_per_search)
        if allowance is not None and outcome.attempts == 0:
            # Answered from the cache (or nothing was sent): no provider call to pay for.
            await allowance.refund()
        record.backend = outcome.backend
        record.latency_s = outcome.latency_s
        record.errors = list(outcome.errors)
        record.attempts = outcome.attempts
        record.cache_hit = outcome.cache_hit
        if outcome.error is None:
            # URLs go to the trace and to `url_citation`s as they are: make them inert.
            record.documents = [replace(d, url=sanitize_url(d.url)) for d in outcome.documents]
            record.information = format_documents(outcome.documents, self.config.max_doc_chars)
        else:
            record.fallback = outcome.error

    def _insert_documents(self, record: SearchRecord) -> list[TextDelta]:
        """The information block of an external search, its documents marked as inserted."""
        deltas = [self._insert(INFO_PREFIX)]
        start = len(self.transcript)
        deltas.append(self._insert(record.information))
        self._inserted.append((start, len(self.transcript)))
        deltas.append(self._insert(INFO_SUFFIX))
        return deltas

    async def _answer(self, prefix: str, stop: tuple[str, ...]) -> AsyncIterator[LoopEvent]:
        """Make the model answer: write `<answer>`, let it fill, close the tag.

        The request's answer turn shapes this call only: its stop strings join `stop`, its
        structured-output constraint (response_format, a forced tool call) applies, and a
        constrained or multi-line answer is not cut at the protocol's own line stops.
        Without room for one answer token and the tags, nothing is written: an opened but
        never closed `<answer>` would leave a transcript that ends inside a block.
        """
        turn = self.config.answer_turn
        # The tags are the loop's: they take context, not the completion budget.
        tags = self._tokens(prefix + ANSWER_OPEN, ANSWER_CLOSE)
        if min(self._room(), self.engine.max_model_len - len(self.ids) - tags) <= 0:
            raise _OutOfBudget
        yield self._insert(prefix + ANSWER_OPEN)
        if turn.structured is not None:
            # The grammar ends the answer; a protocol stop string could cut a JSON string.
            stop = ()
        elif turn.multiline:
            stop = tuple(s for s in stop if s not in ("\n", "</")) or (ANSWER_CLOSE,)
        stop = tuple(dict.fromkeys((*stop, *turn.stop)))
        guided = self.config.mode == "guided"
        penalty = 0.0
        if guided:
            free = turn.structured is None
            penalty = GUIDED_ANSWER_FREQUENCY_PENALTY if free else GUIDED_STRUCTURED_FREQUENCY_PENALTY
        # The closing tag is the loop's to write: keep context for it.
        closing = self._tokens(ANSWER_CLOSE)
        # A shaped answer (JSON, a tool call) may use all that is left; its reserve only keeps
        # the searches from eating into it.
        cap = self.config.max_tokens if turn.multiline else self.config.answer_cap
        async for item in self._generate(
            stop,
            cap,
            False,
            answer=True,
            context_reserve=closing,
            # A guided answer must not loop (output tokens only: the documents stay free to copy).
            frequency_penalty=penalty,
            structured=turn.structured,
        ):
            if isinstance(item, Segment):
                self._keep(item)
            else:
                yield item
        yield self._insert(ANSWER_CLOSE)

    # ----- the two modes ---------------------------------------------------------------

    async def _guided(self) -> AsyncIterator[LoopEvent]:
        searches = min(self.config.guided_searches, self.config.max_turns)
        # Searches never eat the answer turn's room: its cap plus its tags stay free, so a
        # budget hit while searching still ends with an answer (never with documents).
        # (The question line before the answer is not reserved: a tight budget drops it.)
        answer_room = self.config.answer_cap + self._tokens("\n" + ANSWER_OPEN, ANSWER_CLOSE)
        self._fill_reserve = answer_room + self._tokens(INFO_SUFFIX)
        # The query call also leaves room for the tags after it and one token of fill.
        query_reserve = self._fill_reserve + self._tokens(" " + SEARCH_CLOSE, INFO_PREFIX) + 1
        # A counterfactual branch resumes here with its earlier searches already made.
        for _turn in range(len(self.records), searches):
            if self._room() - self._tokens(SEARCH_OPEN) - query_reserve <= 0:
                # The budget, not the model, ended the searches: said in the notes; the
                # finish_reason is the answer's own (a whole answer is a "stop").
                self.notes.append(
                    "searching stopped early: the token budget or the context ran out; "
                    "what is left is kept for the answer"
                )
                break
            # No space after the tag: the model writes the query's first word with its own
            # leading space (" Oliver"), as in the examples; a prompt ending in a lone " "
            # token pushes a small model towards digits (years) instead of words.
            yield self._insert(SEARCH_OPEN)
            segment: Segment | None = None
            async for item in self._generate(
                (SEARCH_CLOSE, "\n"), self.config.max_query_tokens, logprobs=True, reserve=query_reserve
            ):
                if isinstance(item, Segment):
                    segment = item
                else:
                    yield item
            assert segment is not None
            self._keep(segment)
            yield self._insert(SEARCH_CLOSE if segment.text.endswith(" ") else " " + SEARCH_CLOSE)
            async for event in self._search_turn(segment, 0):
                yield event
            if self.records[-1].route == "skipped":
                break
        # The answer is one line; any closing tag ends it too (a small model may write
        # `Pacific Ocean </information>`).
        prefix = "" if self.transcript.endswith("\n") else "\n"
        cue = answer_cue(self.config.question)
        # The question line only where the answer keeps its whole room after it: a tight
        # budget spends its last tokens on the answer, not on repeating the question.
        if (
            cue
            and self._room() - self._tokens(prefix + cue + ANSWER_OPEN, ANSWER_CLOSE)
            >= self.config.answer_cap
        ):
            prefix += cue
        async for event in self._answer(prefix, (ANSWER_CLOSE, "\n", "</")):
            yield event

    async def _native(self) -> AsyncIterator[LoopEvent]:
        # A shaped answer (stop strings, a schema, a tool call) is a turn of its own: the
        # model's free text stops where it opens `<answer>`, and the loop generates the rest.
        shaped = self.config.answer_turn.shaped
        ends = (ANSWER_OPEN,) if shaped else (ANSWER_CLOSE,)
        while True:
            segment: Segment | None = None
            # One request, read on across every search the model fills itself; `</search>` is
            # watched, not a stop string, so that the engine goes on writing while we decide.
            async for item in self._generate(
                ends,
                self.config.max_tokens,
                logprobs=True,
                final=True,
                watch=SEARCH_CLOSE,
                resume=self._live is not None and not self._live.spent,
            ):
                if isinstance(item, Segment):
                    segment = item
                else:
                    yield item
            assert segment is not None
            self._keep(segment)
            if segment.stop == ANSWER_OPEN:
                async for event in self._answer("", (ANSWER_CLOSE,)):
                    yield event
                return
            if segment.stop == ANSWER_CLOSE:
                yield self._insert(ANSWER_CLOSE)
                return
            if segment.stop != SEARCH_CLOSE:
                await self._drop_live()
                if shaped and segment.finish_reason != "length":
                    # EOS without an answer: the request's shape still gets its answer turn.
                    async for event in self._answer("\n\n", (ANSWER_CLOSE,)):
                        yield event
                return  # EOS or length: the model ended without an answer
            yield self._insert(SEARCH_CLOSE)
            searched = sum(1 for r in self.records if r.route != "skipped")
            if searched >= self.config.max_turns:
                await self._drop_live()
                self.notes.append(
                    f"max_turns ({self.config.max_turns}) reached; the model was made to answer"
                )
                async for event in self._answer("\n\n", (ANSWER_CLOSE,)):
                    yield event
                return
            opened = segment.text.rfind(SEARCH_OPEN)
            if opened < 0:
                self.notes.append("a </search> without its <search> was ignored")
                continue
            async for event in self._search_turn(segment, opened + len(SEARCH_OPEN)):
                yield event

    # ----- counterfactual branches ------------------------------------------------------

    def _fork(self, record: SearchRecord) -> SelfSearchLoop:
        """A copy of this trajectory as it stands right after `record`'s query closed (taken
        synchronously: the trajectory itself moves on at once)."""
        fork = copy.copy(self)
        # The branch spends what the trajectory had left at the branch point; no nested branches.
        left = max(0, self.config.max_tokens - self.completion_tokens)
        fork.config = replace(self.config, counterfactual=False, max_tokens=left)
        fork.request_id = f"{self.request_id}-cf{record.index}"
        fork.ids = list(self.ids)
        fork.records = list(self.records[:-1])
        fork.notes = []
        fork._inserted = list(self._inserted)
        fork._branches = []
        # The branch makes its own requests; the trajectory's live one stays the trajectory's.
        fork._live = None
        fork._calls = 0
        fork.prompt_tokens = fork.completion_tokens = 0
        return fork

    async def _branch(self, fork: SelfSearchLoop, record: SearchRecord) -> Counterfactual:
        """From the prefix that closed `record`'s query, search externally and finish the
        trajectory (later searches decided by the same policy), silently."""
        outcome = Counterfactual(at=record.index, query=record.query)
        start = len(fork.transcript)
        searched = SearchRecord(
            record.index, record.query, record.entropy, "external", "counterfactual branch", record.policy
        )
        outcome.search = searched
        await self._search_into(searched)
        if searched.fallback is not None:
            outcome.error = f"the search failed ({searched.fallback}); the branch would self-fill too"
            return outcome
        fork.records.append(searched)
        fork._insert_documents(searched)
        steps = fork._guided() if self.config.mode == "guided" else fork._native()
        try:
            async for _event in steps:
                pass
        except _OutOfBudget:
            fork._finish_reason = "length"
        final = fork._result()
        outcome.answer, outcome.answered = final.answer, final.answered
        outcome.transcript = fork.transcript[start:]
        outcome.prompt_tokens, outcome.completion_tokens = fork.prompt_tokens, fork.completion_tokens
        outcome.finish_reason = final.finish_reason
        outcome.engine_requests = fork._calls
        return outcome

    async def _counterfactuals(self) -> list[Counterfactual]:
        if not self._branches:
            return []
        done = await asyncio.gather(*self._branches)
        self.prompt_tokens += sum(c.prompt_tokens for c in done)
        self.completion_tokens += sum(c.completion_tokens for c in done)
        return list(done)

    # ----- driver ------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[LoopEvent]:
        steps = self._guided() if self.config.mode == "guided" else self._native()
        answer_streamed = False
        try:
            async for event in steps:
                answer_streamed |= isinstance(event, TextDelta) and bool(event.answer)
                yield event
        except _OutOfBudget:
            self._finish_reason = "length"
            self.notes.append("the token budget or the context ran out")
        except BaseException:
            for task in self._branches:
                task.cancel()
            raise
        finally:
            # A trajectory that ends (or fails) while a request is live leaves none behind.
            if self._live is not None:
                with contextlib.suppress(Exception):
                    await self._drop_live(deliberate=False)
        # Branch tokens count in usage (they are engine work), not in the trajectory's budget.
        branches = await self._counterfactuals()
        result = self._result()
        result.counterfactuals = branches
        if not answer_streamed and result.answer:
            # Native mode cannot tell the answer apart while it streams: send it whole.
            yield TextDelta("", result.answer)
        yield LoopFinished(result)

    def _result(self) -> LoopResult:
        # Read from the model's words only: a document that slipped past the sanitiser still
        # could not be (or end) the answer.
        view = self._model_view()
        answer = extract_last_answer(view)
        answered = answer is not None
        if answer is None and self.config.mode == "guided":
            # Guided mode always closes its answer turn; none means there was no room for one.
            self.notes.append("no answer turn fitted in the token budget or the context; content is empty")
            answer = ""
        elif answer is None:
            self.notes.append("the model produced no <answer>; content is its final text")
            answer = _final_text(view)
        removed: list[str] = []
        turn = self.config.answer_turn
        if turn.structured is None and not turn.multiline:
            # JSON and tool calls are the grammar's; a free-text answer loses invented markup.
            answer, removed = clean_answer(answer)
        return LoopResult(
            removed_from_answer=removed,
            answer=answer,
            answered=answered,
            transcript=self.transcript,
            searches=self.records,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            finish_reason=self._finish_reason,
            notes=self.notes,
            answer_tokens=self._answer_tokens if answered else 0,
            engine_requests=self._calls,
        )


async def _after(
    first: GenerationDelta, rest: AsyncIterator[GenerationDelta]
) -> AsyncIterator[GenerationDelta]:
    """`first` (unless empty), then `rest` unless `first` already finished the request."""
    if first.text or first.token_ids or first.finish_reason is not None:
        yield first
    if first.finish_reason is None:
        async for delta in rest:
            yield delta


_PROTOCOL_TAGS = tuple(tag(name) for name in TAG_NAMES for tag in (open_tag, close_tag))


def _final_text(transcript: str) -> str:
    """Best final text without an answer: what follows the last protocol tag, else all text.

    `transcript` is the model view (server-inserted documents removed), so the fallback is
    only ever the model's own words. Only protocol tags count: a `>` in the model's prose
    (`5 > 3`, `<b>`) is no tag.
    """
    cut = max((transcript.rfind(t) + len(t) for t in _PROTOCOL_TAGS if t in transcript), default=0)
    return strip_tags(transcript[cut:]).strip() or strip_tags(transcript).strip()
