"""The in-process engine: vLLM's `AsyncLLM` behind the `Engine` interface."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.engine.adapters import Adapter, adapter_rank
from router.engine.base import (
    EngineDeadError,
    EngineRequestError,
    GenerationDelta,
    SamplingOptions,
    TokenLogprobs,
)
from router.engine.hf_tokenizer import HFTokenizerEngine

logger = logging.getLogger(__name__)

# The KV block size the in-process engine uses on vLLM's CPU backend unless an
# `--engine-arg block_size=N` says otherwise (vLLM's CPU default is 128). Only full blocks are
# prefix-cached, so every resumed engine call of the self-search loop re-prefills the partial
# last block: 32 cuts that from ~64 tokens to ~16 per call and the model-filled trajectory
# from 1.12-1.19x to 1.04-1.10x a single pass, at the same decode speed (docs/benchmarks.md,
# "Loop overhead and the KV block size"). The CPU attention kernels take any multiple of 32.
CPU_BLOCK_SIZE = 32

# vLLM's CPU backend keeps one core for its engine core process (the scheduler, which
# busy-waits on the model's worker with sched_yield) and binds the model's OpenMP threads to
# the other cores. With 2 usable cores that leaves the model one core. Measured on a 2-core
# Xeon with `ssrl serve` alone (bench/cpu_reserve.py): the model's threads on both cores (the
# scheduler's wait yields to them) decode 1.2-1.5x the tokens/s at 1, 8 and 32 streams, with
# a shorter wait for the first token (docs/benchmarks.md, "The core vLLM's CPU backend
# reserves").
# Larger machines keep vLLM's reservation (there it costs 1/N of the cores, and sharing was
# not measured); an operator's own VLLM_CPU_NUM_OF_RESERVED_CPU or VLLM_CPU_OMP_THREADS_BIND
# always wins.
CPU_SHARE_RESERVED_CORE_MAX_CORES = 2
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, as vLLM's CPU binding sees them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API on this OS
        return os.cpu_count() or 1


def cpu_engine_env(environ: Mapping[str, str], cores: int) -> dict[str, str]:
    """Variables to set before vLLM's CPU engine starts (decides only; sets nothing)."""
    if cores > CPU_SHARE_RESERVED_CORE_MAX_CORES:
        return {}
    if RESERVED_CPU_ENV in environ or environ.get(OMP_BIND_ENV, "auto") != "auto":
        return {}
    return {RESERVED_CPU_ENV: "0"}


def compact_structured_outputs() -> Any:
    """Structured outputs without free whitespace: JSON the engine writes under a schema is
    compact (a small model otherwise spends its budget on newlines and indents, and a forced
    tool call or a schema answer runs out of tokens before it closes). vLLM reads this flag
    per engine only (its xgrammar backend ignores a request's own), and only for an explicit
    xgrammar or guidance backend; xgrammar is the one its `auto` picks for what ssrl sends.
    `--engine-arg structured_outputs_config=...` replaces it."""
    from vllm.config import StructuredOutputsConfig

    return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)


@dataclass(frozen=True)
class EngineConfig:
    """vLLM engine options, with vLLM's own names (`AsyncEngineArgs` fields)."""

    model: str
    served_model_name: str
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_logprobs: int = 20
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    seed: int | None = None
    # LoRA adapters served beside the base model (router.engine.adapters), numbered.
    adapters: tuple[Adapter, ...] = ()
    # Any other `AsyncEngineArgs` field, passed through untouched.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def engine_args(self, on_cpu: bool = False) -> dict[str, Any]:
        """`AsyncEngineArgs` keywords; on the CPU backend with ssrl's block size unless set."""
        args: dict[str, Any] = {
            "model": self.model,
            "served_model_name": [self.served_model_name],
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_logprobs": self.max_logprobs,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": self.enforce_eager,
            "max_num_seqs": self.max_num_seqs,
            "seed": self.seed,
        }
        if on_cpu:
            args["block_size"] = CPU_BLOCK_SIZE
        if self.adapters:
            args.update(lora_engine_args(self.adapters))
        args["structured_outputs_config"] = compact_structured_outputs()
        args.update(self.extra)
        return {k: v for k, v in args.items() if v is not None}


# The ranks vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_engine_args(adapters: Sequence[Adapter]) -> dict[str, Any]:
    """vLLM's LoRA settings for these adapters: the smallest allowed rank that holds the largest
    adapter, and every adapter resident at once (they are few and small)."""
    rank = max((adapter_rank(a.path) or 16 for a in adapters), default=16)
    max_rank = next((r for r in _LORA_RANKS if r >= rank), _LORA_RANKS[-1])
    return {
        "enable_lora": True,
        "max_lora_rank": max_rank,
        "max_loras": len(adapters),
        "max_cpu_loras": len(adapters),
    }


class VLLMEngine(HFTokenizerEngine):
    """`Engine` over an `AsyncLLM` running in this process (its core in a child process)."""

    def __init__(self, llm: Any, config: EngineConfig) -> None:
        self._llm = llm
        self.config = config
        self._tokenizer = llm.get_tokenizer()
        self._max_model_len: int = llm.model_config.max_model_len
        self.vocab_size: int = llm.model_config.get_vocab_size()
        self._adapters = {a.name: a for a in config.adapters}

    @property
    def async_llm(self) -> Any:
        """vLLM's `AsyncLLM` (an `EngineClient`), for vLLM's own OpenAI serving layer."""
        return self._llm

    @classmethod
    def start(cls, config: EngineConfig) -> VLLMEngine:
        # vLLM is imported here so that everything else imports without it.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = vllm_on_cpu()
        if on_cpu:
            # Read by the engine's child processes, which inherit this environment.
            for name, value in cpu_engine_env(os.environ, usable_cores()).items():
                logger.info("CPU engine: %s=%s (the model's threads may use every core)", name, value)
                os.environ[name] = value
        args = AsyncEngineArgs(**config.engine_args(on_cpu=on_cpu))
        llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        return cls(llm, config)

    async def generate(
        self, prompt: str | Sequence[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        # What vLLM refuses in a request (its own server answers these 400): a bad sampling
        # value, or a number its msgpack encoder cannot carry (OverflowError).
        refused = (VLLMClientError, ValueError, OverflowError)
        prompt_ids = self.prompt_ids(prompt, options.max_tokens)
        try:
            params = _sampling_params(SamplingParams, RequestOutputKind.DELTA, options)
        except refused as exc:
            raise _request_error(exc) from exc
        lora = self._lora_request(options.adapter)
        first = True
        try:
            async for out in self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id, lora_request=lora
            ):
                completion = out.outputs[0]
                yield GenerationDelta(
                    text=completion.text,
                    token_ids=tuple(completion.token_ids),
                    logprobs=_convert_logprobs(completion.token_ids, completion.logprobs),
                    finish_reason=completion.finish_reason,
                    stop_reason=(completion.stop_reason if isinstance(completion.stop_reason, str) else None),
                    prompt_token_count=len(prompt_ids) if first else None,
                )
                first = False
        except VLLMEngineDeadError as exc:
            raise EngineDeadError(str(exc)) from exc
        except refused as exc:
            raise _request_error(exc) from exc

    def _lora_request(self, name: str | None) -> Any:
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        adapter = self._adapters.get(name)
        if adapter is None:
            raise EngineRequestError(
                f"The model `{name}` does not exist.", status=404, code="model_not_found"
            )
        return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.lora_int_id, lora_path=adapter.path)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        if self._llm.errored:
            raise EngineDeadError("the vLLM engine is dead")
        try:
            await self._llm.check_health()
        except Exception as exc:  # vLLM raises its own dead-engine error here
            raise EngineDeadError(str(exc)) from exc

    async def shutdown(self) -> None:
        self._llm.shutdown()


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM runs on its CPU backend (vllm-cpu, or no accelerator)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return True
    return bool(current_platform.is_cpu())


def _sampling_params(cls: Any, output_kind: Any, options: SamplingOptions) -> Any:
    from vllm.sampling_params import StructuredOutputsParams

    structured = StructuredOutputsParams(**options.structured) if options.structured else None
    return cls(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=options.seed,
        stop=list(options.stop) or None,
        logprobs=options.logprobs,
        include_stop_str_in_output=options.include_stop_str_in_output,
        skip_special_tokens=options.skip_special_tokens,
        ignore_eos=options.ignore_eos,
        repetition_penalty=options.repetition_penalty,
        frequency_penalty=options.frequency_penalty,
        structured_outputs=structured,
        output_kind=output_kind,
    )


def _request_error(exc: Exception) -> EngineRequestError:
    """vLLM's refusal of a request, with the parameter it names (VLLMValidationError)."""
    parameter = getattr(exc, "parameter", None)
    return EngineRequestError(
        str(exc) or type(exc).__name__, param=parameter if isinstance(parameter, str) else None
    )


def _convert_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Any]] | None
) -> tuple[TokenLogprobs, ...] | None:
    if logprobs is None:
        return None
    converted = []
    for token_id, position in zip(token_ids, logprobs, strict=False):
        top = {tid: lp.logprob for tid, lp in position.items()}
        decoded = {tid: lp.decoded_token or "" for tid, lp in position.items()}
        sampled = position.get(token_id)
        rank = getattr(sampled, "rank", None)
        converted.append(
            TokenLogprobs(
                token_id=token_id,
                logprob=top.get(token_id, float("-inf")),
                top=top,
                decoded=decoded,
                sampled_rank=rank if isinstance(rank, int) else None,
            )
        )
    return tuple(converted)
