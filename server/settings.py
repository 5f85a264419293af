"""Server settings: flags and `SSRL_*` environment variables, flags winning.

One pydantic-settings model is the single source of truth. `ssrl serve` builds its flags
from the fields (a field `max_model_len` is the flag `--max-model-len` and the variable
`SSRL_MAX_MODEL_LEN`) and passes the flags it was given as init values, which
pydantic-settings ranks above the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from router.engine.adapters import (
    EMBEDDED_ADAPTER_NAME,
    Adapter,
    embedded_adapter,
    numbered,
    parse_lora_modules,
)
from router.engine.base import SEED_MAX, SEED_MIN
from router.engine.default_model import DEFAULT_MODEL_NAME, default_cache_dir
from router.loop import LoopConfig, Mode
from router.policies import POLICIES, known_policies, make_policy

# The loop's defaults are declared once, on `router.loop.LoopConfig`; the settings that
# configure them take their defaults from there.
LOOP_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(LoopConfig)}


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SSRL_", extra="ignore")

    # HTTP
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer key(s) required on /v1/*; comma-separated in SSRL_API_KEY.",
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="Largest request body accepted (bytes); larger -> 413."
    )
    log_level: str = Field("info", description="Log level (debug, info, warning, error).")
    max_in_flight: int | None = Field(
        None, ge=1, description="Requests served at once; past it 429 with Retry-After (none: no cap)."
    )
    rate_limit: float | None = Field(
        None,
        gt=0,
        description="Requests per minute per API key (per client address without "
        "keys); past it 429 with Retry-After (none: unlimited). Shared by all replicas with "
        "--redis-url.",
    )
    redis_url: str | None = Field(
        None,
        description="redis://host:port/db that replicas share: per-key rate limits, search "
        "budgets and the search cache (none: each process keeps its own). Redis out: each "
        "replica goes on with its own state (docs/deploy.md).",
    )
    keys_file: Path | None = Field(
        None,
        description="JSON file of per-API-key overrides of --rate-limit and "
        "--search-budget-per-day (format: docs/deploy.md, server/key_overrides.py).",
    )
    max_header_bytes: int = Field(16384, ge=1024, description="Largest request head accepted (bytes).")
    http_parser: Literal["h11", "httptools"] = Field(
        "h11",
        description="HTTP/1.1 parser: h11 stops reading a request head at "
        "--max-header-bytes; httptools is faster but buffers a head of any size first.",
    )
    max_n: int = Field(16, ge=1, description="Largest `n` a request may ask for.")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask for (none: the context)."
    )
    default_temperature: float | None = Field(
        None,
        ge=0,
        le=2,
        description="Temperature of a request that sets none (none: the model's generation "
        "config; for the embedded model ssrl's measured default, 0).",
    )
    default_top_p: float | None = Field(
        None, gt=0, le=1, description="top_p of a request that sets none (none: as --default-temperature)."
    )
    max_request_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens of work one request may ask for: prompt + max_tokens of every "
        "sequence it runs (each of n choices, self-search votes and counterfactual branches), "
        "checked before generating; past it 400 (none: --max-n x the model's context, what n "
        "plain choices may use anyway, so only amplification meets it). Never below one context.",
    )
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds requests in flight may take to finish after SIGTERM."
    )
    head_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a connection may take to send a complete request head (from "
        "connecting, or from the next request's first byte); past it the socket is closed "
        "(408 if part of a request came). h11 only.",
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a request may take to send its whole body after its head; past "
        "it 408 and the socket is closed. h11 only.",
    )
    keep_alive_timeout: int = Field(
        30, ge=1, description="Seconds an idle kept-alive connection stays open between requests."
    )

    # Model
    model: str | None = Field(
        None,
        description="Local path or Hugging Face id; default: the embedded SmolLM2-135M "
        "(guided), with its native adapter beside it. `smollm2-135m-ssrl`: that adapter merged "
        "into a model of its own (native, about twice as fast as through LoRA).",
    )
    served_model_name: str | None = Field(
        None, description="Model name clients send and see; default: a readable name."
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="Where the converted default model lives."
    )
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapters of the model, each served under its own name in native mode: "
        "name=path or a JSON object with name and path (vLLM's flag and formats).",
    )
    native_adapter: bool = Field(
        True,
        description="With the embedded model, also serve its native self-search adapter "
        "(smollm2-135m-ssrl, trained by train/).",
    )

    # Remote engine mode: route in front of an existing vLLM OpenAI server instead.
    engine_url: str | None = Field(
        None,
        description="Base URL of a vLLM OpenAI server (e.g. http://vllm:8000/v1) to "
        "generate with instead of an in-process engine; --model then names the tokenizer.",
    )
    engine_api_key: str | None = Field(None, description="Bearer key of the remote engine.")
    engine_timeout: float = Field(
        600.0, gt=0, description="Seconds a remote engine call may stay silent before it fails."
    )
    remote_model: str | None = Field(
        None, description="Model name at the remote engine (default: the first it lists)."
    )

    # Engine (vLLM's names)
    dtype: str = Field("auto", description="vLLM --dtype.")
    max_model_len: int | None = Field(None, gt=0, description="vLLM --max-model-len.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM --tensor-parallel-size.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization.")
    max_logprobs: int = Field(20, ge=0, description="vLLM --max-logprobs.")
    enable_prefix_caching: bool = Field(True, description="vLLM --enable-prefix-caching.")
    enforce_eager: bool | None = Field(
        None,
        description="vLLM --enforce-eager (skip torch.compile); --no-enforce-eager compiles. "
        "Default (none): eager on the CPU backend, where torch.compile adds minutes of start-up "
        "(docs/benchmarks.md), compiled on a GPU.",
    )
    max_num_seqs: int | None = Field(None, gt=0, description="vLLM --max-num-seqs.")
    cpu_kvcache_space: int | None = Field(
        2,
        ge=0,
        description="GiB of KV cache on the CPU backend (VLLM_CPU_KVCACHE_SPACE, which wins "
        "when set); without it vLLM reserves a fraction of the node's memory and may refuse to start.",
    )
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="vLLM --seed.")
    engine_arg: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Any other vLLM engine argument as KEY=VALUE (repeatable).",
    )
    warmup: bool = Field(True, description="Run one tiny request before accepting traffic.")

    # vLLM's own OpenAI serving layer (requests that do not self-search)
    openai_serving: Literal["auto", "ssrl", "vllm"] = Field(
        "auto",
        description="Who answers chat without self-search and /v1/completions: ssrl's own "
        "serving (`ssrl`: a field it cannot honour is a 400), vLLM's OpenAI serving classes in "
        "process (`vllm`: every vLLM request field, tools, structured outputs, vLLM's own "
        "400s), or `auto`: ssrl's own unless the request sets a field only vLLM's honours "
        "(tools, response_format, logit_bias, ...). /v1/responses, /tokenize, /detokenize and "
        "/version always use vLLM's.",
    )
    enable_auto_tool_choice: bool = Field(
        False, description='vLLM --enable-auto-tool-choice (tool_choice "auto"; needs --tool-call-parser).'
    )
    tool_call_parser: str | None = Field(None, description="vLLM --tool-call-parser (e.g. hermes).")
    chat_template: str | None = Field(
        None, description="vLLM --chat-template (a file or an inline template) for vLLM's serving layer."
    )

    # Self-search (defaults for every request; a request may override within the caps)
    self_search: bool = Field(True, description="Run the self-search loop on chat requests by default.")
    search_mode: Literal["auto", "native", "guided"] = Field(
        "auto",
        description="Protocol mode: native (SSRL-trained models), guided (any instruct "
        "model), auto (guided for the embedded default model, native otherwise).",
    )
    search_policy: str = Field(
        "threshold",
        description=f"Routing policy: {', '.join(POLICIES)}, or one an ssrl.policies entry point adds.",
    )
    search_threshold: float = Field(
        # From the counterfactual sweep of the embedded model on the dev set (`ssrl eval --data
        # dev --max-turns 1 --sweep`, then `ssrl calibrate --target-call-rate 0.4 --aggregate
        # max`): docs/evaluation.md "Entropy estimate and the default threshold".
        4.85,
        allow_inf_nan=False,
        description="tau: external search when the query's aggregate entropy (nats) is above it "
        "(for min_prob: when the lowest token probability is below it).",
    )
    search_aggregate: Literal["mean", "max", "min_prob", "ssrl"] = Field(
        "max", description="Per-query aggregate of token entropies the policy compares."
    )
    search_budget: int | None = Field(
        None, ge=0, description="External calls per trajectory for the budget policy."
    )
    search_budget_per_day: int | None = Field(
        None,
        ge=0,
        description="External searches one API key (client address without keys) may cause per "
        "UTC day, over all replicas with --redis-url; past it searches are self-filled (trace: "
        'fallback "budget") and /v1/search, /retrieve answer 429 (none: unlimited).',
    )
    max_turns: int = Field(
        LOOP_DEFAULTS["max_turns"], ge=1, le=16, description="Most searches per trajectory (as in SSRL)."
    )
    docs_per_search: int = Field(
        LOOP_DEFAULTS["docs_per_search"], ge=1, le=20, description="Documents inserted per external search."
    )
    max_external_calls: int | None = Field(
        None, ge=0, description="Cap on external calls per trajectory (none: unlimited)."
    )
    entropy_top_k: int = Field(
        LOOP_DEFAULTS["logprobs_k"],
        ge=1,
        description="Top-k logprobs per query token used to estimate entropy.",
    )
    max_doc_chars: int = Field(
        LOOP_DEFAULTS["max_doc_chars"],
        ge=20,
        description="Characters kept of each inserted document, cut at a sentence end (a "
        "sentence ending within half as many more, at most 100, is finished).",
    )
    max_query_tokens: int = Field(
        LOOP_DEFAULTS["max_query_tokens"], ge=1, description="Cap on a query's length in tokens."
    )
    max_information_tokens: int = Field(
        LOOP_DEFAULTS["max_information_tokens"],
        ge=1,
        description="Cap on a self-written <information> block in tokens.",
    )
    max_answer_tokens: int = Field(
        LOOP_DEFAULTS["max_answer_tokens"], ge=1, description="Cap on the <answer> in tokens (guided mode)."
    )
    search_with_question: bool = Field(
        True,
        description="Guided mode and the embedded native adapter: send the search backend the "
        "model's query followed by the user's question (a short query then still finds its "
        "article); the entropy and the routing decision stay the query's. The trace's sent_query "
        "shows what was sent.",
    )
    guided_searches: int = Field(
        LOOP_DEFAULTS["guided_searches"],
        ge=1,
        description="Searches the guided mode drives before the answer (capped by max_turns).",
    )
    max_loop_tokens: int = Field(
        LOOP_DEFAULTS["max_tokens"],
        ge=16,
        description="Default token budget of one trajectory when max_tokens is absent.",
    )
    max_votes: int = Field(8, ge=1, description="Most samples a majority-vote request may ask for.")
    system_prompt_file: Path | None = Field(
        None, description="Replace the shipped system prompt of the active mode with this file."
    )
    search: str = Field(
        "local",
        description="Search backend chain, comma-separated, tried in order: local, "
        "serper, tavily, brave, searxng, exa, google, wikipedia, retriever, an entry-point "
        "backend, or none.",
    )
    search_option: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="A backend option as BACKEND.KEY=VALUE, e.g. retriever.base_url=http://h:8000 "
        "(repeatable; comma-separated in SSRL_SEARCH_OPTION).",
    )
    searxng_url: str | None = Field(None, description="Base URL of a SearXNG instance.")
    secrets_file: Path | None = Field(
        None,
        description="KEY=VALUE or JSON file of provider keys (SERPER_API_KEY, ...); "
        "environment variables win. Keys are never accepted as flags.",
    )
    search_max_attempts: int = Field(3, ge=1, le=10, description="Attempts per search call.")
    search_breaker_failures: int = Field(
        5, ge=0, description="Consecutive failures that open a backend's circuit (0: never)."
    )
    search_breaker_reset: float = Field(
        30.0, gt=0, description="Seconds an open circuit waits before one trial call."
    )
    search_concurrency: int = Field(8, ge=1, description="Concurrent calls per backend.")
    search_rate_limit: float | None = Field(
        None, gt=0, description="Calls per second per backend (none: unlimited)."
    )
    search_cache_size: int = Field(
        1024, ge=0, description="Cached queries (normalised query -> documents); 0 turns it off."
    )
    search_cache_ttl: float = Field(600.0, gt=0, description="Seconds a cached result lives.")
    search_cache_url: str | None = Field(
        None,
        description="The former name of --redis-url, kept as its alias (both set: they must be equal).",
    )
    index_dir: Path | None = Field(
        None, description="Local BM25 index directory; default: the offline Wikipedia summaries index."
    )
    search_timeout: float = Field(
        15.0, gt=0, description="Deadline of one search (all its attempts) in seconds."
    )

    _split_keys = field_validator("api_key", "engine_arg", "search_option", mode="before")(_split_csv)

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _split_lora_modules(cls, value: Any) -> Any:
        # SSRL_LORA_MODULES: space-separated items (a JSON item holds commas), or a JSON list.
        if isinstance(value, str):
            import json

            text = value.strip()
            return json.loads(text) if text.startswith("[") else text.split()
        return value

    @field_validator("lora_modules")
    @classmethod
    def _valid_lora_modules(cls, value: list[str]) -> list[str]:
        numbered(parse_lora_modules(value))  # raises ValueError naming the bad item
        return value

    @property
    def uses_default_model(self) -> bool:
        return self.model is None

    @property
    def serves_embedded_native(self) -> bool:
        """`--model smollm2-135m-ssrl`: the embedded native adapter merged into its base and
        served as a model of its own (router.engine.merge), faster than through LoRA."""
        return self.model == EMBEDDED_ADAPTER_NAME

    @property
    def embedded_weights(self) -> bool:
        """The embedded model or its merged native model: the same tokenizer, template and
        tool format, and ssrl's measured sampling defaults."""
        return self.uses_default_model or self.serves_embedded_native

    def base_profile(self) -> Adapter | None:
        """The served model's own SSRL profile, for the merged native model (else None)."""
        if not self.serves_embedded_native or (shipped := embedded_adapter()) is None:
            return None
        return replace(shipped, merged=True)

    def model_path(self) -> str:
        """What the engine loads: --model, or the embedded checkpoint (converted, or merged
        with the native adapter) in the cache, made on first use."""
        if self.serves_embedded_native:
            from router.engine.merge import ensure_native_checkpoint

            return str(ensure_native_checkpoint(self.cache_dir))
        if self.model is not None:
            return self.model
        from router.engine.default_model import ensure_default_checkpoint as ensure

        return str(ensure(self.cache_dir))

    def adapters(self) -> list[Adapter]:
        """The LoRA adapters this server serves, numbered as vLLM numbers them: the embedded
        native adapter first (with the embedded model, unless --no-native-adapter), then
        --lora-modules. Remote engine mode serves none of its own: the upstream lists its own."""
        if self.engine_url:
            return []
        listed: list[Adapter] = []
        if self.uses_default_model and self.native_adapter and (shipped := embedded_adapter()):
            listed.append(shipped)
        listed += parse_lora_modules(self.lora_modules)
        return numbered(listed)

    @property
    def shared_redis_url(self) -> str | None:
        """The one Redis replicas share: --redis-url, or its alias --search-cache-url."""
        return self.redis_url or self.search_cache_url

    @model_validator(mode="after")
    def _adapters_need_an_engine(self) -> ServeSettings:
        if self.engine_url and self.lora_modules:
            raise ValueError(
                "--lora-modules needs the in-process engine; with --engine-url, give the adapters "
                "to the remote vLLM server (its own --lora-modules) and request them by name"
            )
        names = [a.name for a in self.adapters()]
        if self.model_name in names:
            raise ValueError(f"--lora-modules: {self.model_name!r} is the base model's own name")
        return self

    @model_validator(mode="after")
    def _one_redis(self) -> ServeSettings:
        if self.redis_url and self.search_cache_url and self.redis_url != self.search_cache_url:
            raise ValueError(
                "--search-cache-url is an alias of --redis-url; set one of them (or both the same)"
            )
        if self.shared_redis_url:
            import importlib.util

            if importlib.util.find_spec("redis") is None:
                raise ValueError("--redis-url needs the redis package: pip install 'ssrl[redis]'")
        return self

    @model_validator(mode="after")
    def _keys_file_reads(self) -> ServeSettings:
        # A keys file that cannot be read would leave keys without the limits they were given.
        from server.key_overrides import load_key_overrides

        load_key_overrides(self.keys_file)
        return self

    @model_validator(mode="after")
    def _top_k_within_engine_limit(self) -> ServeSettings:
        # The loop asks the engine for entropy_top_k logprobs per token; vLLM refuses more
        # than --max-logprobs, so a mismatch would fail every self-search request.
        if self.self_search and self.entropy_top_k > self.max_logprobs:
            raise ValueError(
                f"--entropy-top-k ({self.entropy_top_k}) exceeds --max-logprobs ({self.max_logprobs})"
            )
        return self

    @model_validator(mode="after")
    def _self_search_defaults_work(self) -> ServeSettings:
        # Every request takes these defaults unless it overrides them: a default the loop
        # refuses would answer 400 (param self_search.*) to every chat, so refuse to start.
        if self.search_policy not in known_policies():
            raise ValueError(
                f"--search-policy {self.search_policy!r} is not a policy; expected one of "
                f"{', '.join(known_policies())}"
            )
        if self.search_policy == "budget" and self.search_budget is None:
            raise ValueError("--search-policy budget needs --search-budget (external calls per trajectory)")
        # The threshold is the default tau of every policy that reads one (a request may
        # switch to `threshold`), so it must suit the aggregate: a probability for min_prob.
        try:
            make_policy("threshold", tau=self.search_threshold, aggregate=self.search_aggregate, budget=None)
            make_policy(
                self.search_policy,
                tau=self.search_threshold,
                aggregate=self.search_aggregate,
                budget=self.search_budget,
            )
        except ValueError as exc:
            raise ValueError(
                f"--search-threshold {self.search_threshold} / --search-aggregate "
                f"{self.search_aggregate}: {exc}"
            ) from exc
        return self

    @property
    def resolved_search_mode(self) -> Mode:
        if self.search_mode != "auto":
            return self.search_mode
        return "guided" if self.uses_default_model else "native"

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        return self.model.rstrip("/")

    def extra_engine_args(self) -> dict[str, Any]:
        """`--engine-arg KEY=VALUE` pairs, values parsed as JSON where they parse."""
        import json

        parsed: dict[str, Any] = {}
        for item in self.engine_arg:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--engine-arg expects KEY=VALUE, got {item!r}")
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            parsed[key.strip().replace("-", "_")] = value
        return parsed
