"""The remote engine: an existing vLLM OpenAI server (or a fleet behind a load balancer).

ssrl then runs only the router: inference scales with vLLM's own data and tensor
parallelism, and router replicas stay stateless. Every engine call is a streamed
`POST /v1/completions` on token ids, with vLLM's extensions that keep the loop exact:
`return_token_ids` (the generated ids), `return_tokens_as_token_ids` (logprob keys as
`token_id:N`, so entropies are keyed by id), `include_stop_str_in_output` and `ignore_eos`.
Closing the stream makes vLLM abort the request. The tokenizer (for the chat template and
for inserted text) is loaded locally from the same checkpoint or Hugging Face id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from router.engine.base import (
    EngineDeadError,
    EngineRequestError,
    GenerationDelta,
    SamplingOptions,
    TokenLogprobs,
)
from router.engine.hf_tokenizer import HFTokenizerEngine

logger = logging.getLogger(__name__)

_TOKEN_PREFIX = "token_id:"


@dataclass(frozen=True)
class RemoteEngineConfig:
    base_url: str  # e.g. http://vllm:8000/v1
    tokenizer: str  # local path or Hugging Face id of the served model's tokenizer
    model: str | None = None  # name at the remote server; default: its first model
    api_key: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    max_connections: int = 256


def _token_id(key: str) -> int:
    if not key.startswith(_TOKEN_PREFIX):
        raise ValueError(f"expected a '{_TOKEN_PREFIX}N' key, got {key!r}")
    return int(key[len(_TOKEN_PREFIX) :])


def parse_logprobs(
    token_ids: Sequence[int], logprobs: Mapping[str, Any] | None
) -> tuple[TokenLogprobs, ...] | None:
    """vLLM's completions logprobs (with `return_tokens_as_token_ids`) as TokenLogprobs."""
    if not logprobs:
        return None
    sampled = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    converted = []
    for i, token_id in enumerate(token_ids):
        top_raw = tops[i] if i < len(tops) and tops[i] else {}
        top = {_token_id(k): float(v) for k, v in top_raw.items()}
        logprob = sampled[i] if i < len(sampled) and sampled[i] is not None else top.get(token_id)
        converted.append(
            TokenLogprobs(
                token_id=token_id,
                logprob=float("-inf") if logprob is None else float(logprob),
                top=top,
            )
        )
    return tuple(converted)


# Remote answers that say the request (not the engine) is wrong: the client gets a 400.
_REQUEST_ERRORS = frozenset({400, 413, 422})


def remote_request_error(raw: bytes) -> EngineRequestError:
    """The remote's refusal with its own message, type, param and code, for the client.

    vLLM answers `{"error": {"message", "type", "param", "code"}}` (older versions put the
    fields at the top level); anything else is quoted, cut to 500 characters.
    """
    text = raw.decode(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    error = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return EngineRequestError(f"The engine refused the request: {text[:500]}", status=400)

    def field(name: str) -> str | None:
        value = error.get(name)
        return value if isinstance(value, str) and value else None

    message = error["message"][:2000]
    code = field("code")
    if code is None and "context length" in message.lower():
        code = "context_length_exceeded"
    return EngineRequestError(message, status=400, type=field("type"), param=field("param"), code=code)


class RemoteEngine(HFTokenizerEngine):
    """`Engine` over a vLLM OpenAI-compatible server."""

    def __init__(self, config: RemoteEngineConfig, tokenizer: Any, model: str, max_model_len: int) -> None:
        self.config = config
        self._tokenizer = tokenizer
        self.model = model
        self._max_model_len = max_model_len
        self.vocab_size: int = len(tokenizer)
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_connections),
        )

    @classmethod
    def connect(cls, config: RemoteEngineConfig) -> RemoteEngine:
        """Ask the remote server what it serves, and load the matching tokenizer."""
        from transformers import AutoTokenizer

        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        response = httpx.get(
            config.base_url.rstrip("/") + "/models", headers=headers, timeout=config.connect_timeout_s
        )
        response.raise_for_status()
        models = response.json()["data"]
        card = next((m for m in models if m["id"] == config.model), None) if config.model else models[0]
        if card is None:
            raise ValueError(f"the remote server does not serve {config.model!r}")
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        max_len = card.get("max_model_len") or getattr(tokenizer, "model_max_length", 2048)
        return cls(config, tokenizer, card["id"], int(max_len))

    def _body(self, prompt_ids: list[int], options: SamplingOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt_ids,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "stream": True,
            "stop": list(options.stop) or None,
            "include_stop_str_in_output": options.include_stop_str_in_output,
            "skip_special_tokens": options.skip_special_tokens,
            "ignore_eos": options.ignore_eos,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "stream_options": {"include_usage": False},
        }
        if options.repetition_penalty != 1.0:
            body["repetition_penalty"] = options.repetition_penalty
        if options.frequency_penalty != 0.0:
            body["frequency_penalty"] = options.frequency_penalty
        if options.structured:
            body["structured_outputs"] = dict(options.structured)
        if options.seed is not None:
            body["seed"] = options.seed
        if options.logprobs is not None:
            body["logprobs"] = options.logprobs
        return body

    async def generate(
        self, prompt: str | Sequence[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        prompt_ids = self.prompt_ids(prompt, options.max_tokens)
        first = True
        try:
            async with self._client.stream(
                "POST",
                "/completions",
                json=self._body(prompt_ids, options),
                headers={"X-Request-Id": request_id},
            ) as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    if response.status_code in _REQUEST_ERRORS:
                        raise remote_request_error(raw)
                    raise EngineDeadError(f"the remote engine answered {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        raise EngineDeadError(f"the remote engine failed: {chunk['error'].get('message')}")
                    for choice in chunk.get("choices", []):
                        token_ids = tuple(choice.get("token_ids") or ())
                        stop_reason = choice.get("stop_reason")
                        yield GenerationDelta(
                            text=choice.get("text") or "",
                            token_ids=token_ids,
                            logprobs=parse_logprobs(token_ids, choice.get("logprobs")),
                            finish_reason=choice.get("finish_reason"),
                            stop_reason=stop_reason if isinstance(stop_reason, str) else None,
                            prompt_token_count=len(prompt_ids) if first else None,
                        )
                        first = False
        except httpx.TransportError as exc:
            raise EngineDeadError(f"the remote engine is unreachable: {type(exc).__name__}") from exc

    async def abort(self, request_id: str) -> None:
        # Closing the stream (the caller's cancellation) is what aborts a remote request.
        return None

    async def check_health(self) -> None:
        root = self.config.base_url.rstrip("/").removesuffix("/v1")
        try:
            response = await self._client.get(root + "/health", timeout=5.0)
        except httpx.HTTPError as exc:
            raise EngineDeadError(f"the remote engine is unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise EngineDeadError(f"the remote engine's health is {response.status_code}")

    async def shutdown(self) -> None:
        await self._client.aclose()
