"""Which top-level request fields exist at all: one rule for every path.

A field that neither OpenAI's API, nor vLLM's serving layer, nor ssrl defines for a route is
a 400 naming it (`unknown_parameter`), wherever the request would have gone: vLLM's layer
would accept and drop it with a log line, and ssrl's own serving would ignore it, and the
project's rule is that nothing is silently ignored. Fields some path knows but the path a
request takes cannot honour are the other rule (`server.vllm_serving.SELF_SEARCH_UNSUPPORTED`:
forwarded under `auto`, else 400).

vLLM's field sets are written out (vLLM 0.32) rather than imported, so remote-engine mode
(`ssrl[server]`, no vLLM installed) keeps the rule; tests/unit/test_vllm_coupling.py fails
when vLLM's request models gain a field this list lacks.
"""

from __future__ import annotations

from typing import Any

from server.errors import APIError

# vLLM 0.32's ChatCompletionRequest fields.
VLLM_CHAT_FIELDS = frozenset(
    {
        "add_generation_prompt", "add_special_tokens", "allowed_token_ids", "bad_words",
        "cache_salt", "chat_template", "chat_template_kwargs", "continue_final_message",
        "documents", "ec_transfer_params", "echo", "frequency_penalty", "ignore_eos",
        "include_reasoning", "include_stop_str_in_output", "kv_transfer_params",
        "length_penalty", "logit_bias", "logprob_token_ids", "logprobs",
        "max_completion_tokens", "max_tokens", "media_io_kwargs", "messages", "min_p",
        "min_tokens", "mm_payload", "mm_processor_kwargs", "model", "n",
        "parallel_tool_calls", "presence_penalty", "priority", "prompt_logprobs",
        "reasoning_effort", "repetition_detection", "repetition_penalty", "request_id",
        "response_format", "return_mm_kwargs", "return_prompt_text", "return_token_ids",
        "return_token_offsets", "return_tokens_as_token_ids", "routed_experts_prompt_start",
        "seed", "session_id", "skip_special_tokens", "spaces_between_special_tokens", "stop",
        "stop_token_ids", "stream", "stream_interval", "stream_options", "structured_outputs",
        "temperature", "thinking_token_budget", "tool_choice", "tools", "top_k",
        "top_logprobs", "top_p", "truncate_prompt_tokens", "truncation_side",
        "use_beam_search", "user", "vllm_xargs", "watermarking",
    }
)  # fmt: skip

# vLLM 0.32's CompletionRequest fields.
VLLM_COMPLETION_FIELDS = frozenset(
    {
        "add_special_tokens", "allowed_token_ids", "bad_words", "cache_salt",
        "ec_transfer_params", "echo", "frequency_penalty", "ignore_eos",
        "include_stop_str_in_output", "kv_transfer_params", "length_penalty", "logit_bias",
        "logprob_token_ids", "logprobs", "max_tokens", "min_p", "min_tokens", "mm_payload",
        "model", "n", "presence_penalty", "priority", "prompt", "prompt_embeds",
        "prompt_logprobs", "repetition_detection", "repetition_penalty", "request_id",
        "response_format", "return_mm_kwargs", "return_token_ids", "return_token_offsets",
        "return_tokens_as_token_ids", "routed_experts_prompt_start", "seed", "session_id",
        "skip_special_tokens", "spaces_between_special_tokens", "stop", "stop_token_ids",
        "stream", "stream_interval", "stream_options", "structured_outputs", "suffix",
        "temperature", "thinking_token_budget", "top_k", "top_p", "truncate_prompt_tokens",
        "truncation_side", "use_beam_search", "user", "vllm_xargs", "watermarking",
    }
)  # fmt: skip

# ssrl's own extensions.
SSRL_CHAT_FIELDS = frozenset({"self_search", "web_search_options"})

# OpenAI chat fields that identify a caller or a cache and change no answer: honoured by
# doing nothing, and taken off a request before vLLM's layer (which does not know them).
IDENTIFYING_FIELDS = frozenset({"metadata", "safety_identifier", "prompt_cache_key"})

# OpenAI fields vLLM leaves out that ssrl answers only in their neutral sense: nothing is
# stored, and every request runs on the one tier there is.
NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {"store": (False,), "service_tier": ("auto", "default")}

# OpenAI chat fields vLLM leaves out that a self-search or plain request may still name with
# a value nobody honours (SELF_SEARCH_UNSUPPORTED refuses them).
OPENAI_ONLY_CHAT_FIELDS = frozenset({"functions", "function_call", "audio", "modalities", "prediction"})

KNOWN_FIELDS = {
    "/v1/chat/completions": VLLM_CHAT_FIELDS
    | SSRL_CHAT_FIELDS
    | IDENTIFYING_FIELDS
    | OPENAI_ONLY_CHAT_FIELDS
    | frozenset(NEUTRAL_ONLY),
    "/v1/completions": VLLM_COMPLETION_FIELDS | frozenset(NEUTRAL_ONLY),
}


def check_known_fields(route: str, body: dict[str, Any]) -> None:
    """400 naming the first top-level field no path knows for `route`, or a neutral-only
    field set to something else."""
    known = KNOWN_FIELDS[route]
    for name in body:
        if name not in known:
            raise APIError(
                400,
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
    for name, neutral in NEUTRAL_ONLY.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise APIError(
                400,
                f"'{name}' can only be {' or '.join(repr(v) for v in neutral)} on this server.",
                param=name,
                code="unsupported_parameter",
            )


def without_openai_only(body: dict[str, Any]) -> dict[str, Any]:
    """`body` less what is honoured by doing nothing (identifiers, neutral-only fields), so
    vLLM's layer never logs them as ignored; `body` itself when there is none."""
    drop = (IDENTIFYING_FIELDS | frozenset(NEUTRAL_ONLY)) & body.keys()
    return {k: v for k, v in body.items() if k not in drop} if drop else body
