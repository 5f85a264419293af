"""A deterministic `Engine` for unit tests: it replays scripted token streams.

Each call to `generate` takes the next script from the queue (or asks a callback), then
emits its tokens one delta at a time, honouring stop strings the way vLLM does (the text
ends at the stop string, included when asked; the token holding it is the last one).
The "tokenizer" maps every character to one token id (its code point + 10), so offsets
are easy to reason about, and a piece may also be a multi-character token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from router.engine.base import (
    EngineDeadError,
    GenerationDelta,
    PromptTooLongError,
    SamplingOptions,
    TokenLogprobs,
)

OFFSET = 10
EOS = 2


class CharTokenizer:
    """One token per character; multi-character tokens are registered on demand."""

    eos_token_id = EOS

    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}
        self._ids: dict[str, int] = {}

    def piece_id(self, piece: str) -> int:
        if len(piece) == 1:
            return ord(piece) + OFFSET
        if piece not in self._ids:
            token_id = 0x110000 + OFFSET + len(self._ids)
            self._ids[piece] = token_id
            self._pieces[token_id] = piece
        return self._ids[piece]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) + OFFSET for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for t in token_ids:
            if t == EOS:
                continue
            out.append(self._pieces.get(t) or chr(t - OFFSET))
        return "".join(out)


@dataclass
class Step:
    """One scripted token: its text, its probability, and optional alternatives."""

    piece: str
    prob: float = 0.9
    # Other candidates' probabilities (their ids are made up; only the mass matters).
    alternatives: tuple[float, ...] = (0.05,)


@dataclass
class Script:
    steps: list[Step]
    finish_eos: bool = True


def script(text: str, prob: float = 0.9, alternatives: tuple[float, ...] = (0.05,)) -> Script:
    """A script of one token per character, every token with the same distribution."""
    return Script([Step(c, prob, alternatives) for c in text])


def pieces(*parts: str | tuple[str, float]) -> Script:
    """A script of multi-character tokens, e.g. pieces("<sea", "rch>", ("Paris", 0.3))."""
    steps = []
    for part in parts:
        if isinstance(part, tuple):
            steps.append(Step(part[0], part[1]))
        else:
            steps.append(Step(part))
    return Script(steps)


@dataclass
class Call:
    """What one `generate` call was asked."""

    prompt: list[int]
    options: SamplingOptions
    request_id: str
    prompt_text: str = ""


@dataclass
class ScriptedEngine:
    """Replays scripts in order; records every call."""

    scripts: list[Script] = field(default_factory=list)
    responder: Callable[[Call], Script] | None = None
    max_model_len: int = 4096
    delay: float = 0.0
    dead: bool = False
    calls: list[Call] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    vocab_size: int = 50_000

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.tokenizer.encode(text)

    def _next_script(self, call: Call) -> Script:
        if self.responder is not None:
            return self.responder(call)
        if not self.scripts:
            raise AssertionError("the scripted engine ran out of scripts")
        return self.scripts.pop(0)

    async def generate(
        self, prompt: str | Sequence[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        if self.dead:
            raise EngineDeadError("scripted engine is dead")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + options.max_tokens > self.max_model_len:
            raise PromptTooLongError("prompt too long for the scripted engine")
        call = Call(ids, options, request_id, self.tokenizer.decode(ids))
        self.calls.append(call)
        plan = self._next_script(call)
        text = ""
        emitted = 0
        # Like vLLM, text that may be the start of a stop string is held back until decided,
        # and a stop string excluded from the output never appears in any delta.
        holdback = (
            0 if options.include_stop_str_in_output else max((len(s) for s in options.stop), default=1) - 1
        )
        first = True
        for count, step in enumerate(plan.steps, start=1):
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)
            token_id = self.tokenizer.piece_id(step.piece)
            before = len(text)
            text += step.piece
            window = max(0, before - max((len(s) for s in options.stop), default=0))
            hits = [(text.index(s, window), s) for s in options.stop if s in text[window:]]
            stop_hit = min(hits)[1] if hits else None
            finish = None
            if stop_hit is not None:
                end = text.index(stop_hit, window)
                text = text[: end + (len(stop_hit) if options.include_stop_str_in_output else 0)]
                finish = "stop"
            elif count >= options.max_tokens:
                finish = "length"
            elif count == len(plan.steps):
                finish = "stop" if plan.finish_eos else "length"
            visible = len(text) if finish else max(emitted, len(text) - holdback)
            piece, emitted = text[emitted:visible], max(emitted, visible)
            logprobs = None
            if options.logprobs is not None:
                top = {token_id: _log(step.prob)}
                for i, p in enumerate(step.alternatives[: max(options.logprobs, 0)]):
                    top[900_000 + i] = _log(p)
                logprobs = (
                    TokenLogprobs(
                        token_id=token_id, logprob=_log(step.prob), top=top, decoded={token_id: step.piece}
                    ),
                )
            yield GenerationDelta(
                text=piece,
                token_ids=(token_id,),
                logprobs=logprobs,
                finish_reason=finish,
                stop_reason=stop_hit,
                prompt_token_count=len(ids) if first else None,
            )
            first = False
            if finish is not None:
                return

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("scripted engine is dead")

    async def shutdown(self) -> None:
        return None


def _log(p: float) -> float:
    import math

    return math.log(p) if p > 0 else float("-inf")
