"""The small engine interface the router and the HTTP layer generate through.

An engine turns a prompt (text or token ids) into a stream of deltas that carry the new
token ids, their text and, when asked, the top-k logprobs at every generated position.
The vLLM implementation lives in `router.engine.vllm_engine`; tests use a scripted one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """What one engine call may be asked; names follow vLLM's `SamplingParams`."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Top-k logprobs per generated token (None: none at all). The sampled token is always
    # included on top of the k, as vLLM does.
    logprobs: int | None = None
    include_stop_str_in_output: bool = True
    # Ask the engine to skip special tokens in the decoded text (vLLM default True).
    skip_special_tokens: bool = True
    # Keep generating past EOS (benchmarks that need an exact token count).
    ignore_eos: bool = False
    # Penalise tokens already in the prompt or the output (vLLM: 1.0 = off, > 1 discourages
    # repeats); guided mode's short turns use it against degenerate repetition.
    repetition_penalty: float = 1.0
    # Penalise output tokens by how often they were already generated (vLLM: 0.0 = off); unlike
    # repetition_penalty it leaves the prompt's (the documents') tokens alone.
    frequency_penalty: float = 0.0
    # A constraint on the output, as the fields of vLLM's `StructuredOutputsParams` (`json`,
    # `json_object`, `regex`, `choice`, `grammar`, ...): the answer turn under a request's
    # response_format or forced tool choice. None: free text.
    structured: Mapping[str, Any] | None = None
    # The LoRA adapter (its served name, router.engine.adapters) this call runs on; None: the
    # base model.
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The logprob of the sampled token and the engine's top-k alternatives at one position."""

    token_id: int
    logprob: float
    # token id -> logprob for the top-k candidates (may include the sampled token).
    top: dict[int, float] = field(default_factory=dict)
    # token id -> decoded text, where the engine provides it (for OpenAI `top_logprobs`).
    decoded: dict[int, str] = field(default_factory=dict)
    # 1-based rank of the sampled token in the full distribution, where the engine says (vLLM
    # does): tells a sampled token added beyond the top-k from a top-k member.
    sampled_rank: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """What one engine step adds to a sequence. The last delta has `finish_reason` set."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None = None
    # "stop" (EOS or a stop string), "length", or "abort".
    finish_reason: str | None = None
    # The stop string that ended generation, when one did.
    stop_reason: str | None = None
    # Filled on the first delta of a request.
    prompt_token_count: int | None = None


# Seeds are int64, as vLLM's OpenAI server bounds them (its msgpack encoder refuses more).
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1


def offset_seed(seed: int | None, offset: int) -> int | None:
    """`seed + offset`, wrapped into the int64 range (None stays None).

    Every per-choice, per-sample and per-call seed offset goes through here, so that a seed
    near the bound (2**63 - 1 with n > 1) stays a valid, reproducible seed.
    """
    if seed is None:
        return None
    return (seed + offset - SEED_MIN) % 2**64 + SEED_MIN


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests (the HTTP layer answers 503)."""


class PromptTooLongError(ValueError):
    """The prompt (plus requested tokens) does not fit the model's context."""


class EngineRequestError(ValueError):
    """The engine refused this request (not the engine's health): the HTTP layer answers
    `status` with the engine's own message, type, param and code."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code


@runtime_checkable
class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the server needs."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@runtime_checkable
class Engine(Protocol):
    """An async text generator; one sequence per call (n > 1 is n calls)."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]: ...

    def generate(
        self, prompt: str | Sequence[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[GenerationDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise `EngineDeadError` when the engine can no longer serve."""
        ...

    async def shutdown(self) -> None: ...
