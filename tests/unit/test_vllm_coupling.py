"""The vLLM internals server/vllm_serving.py depends on: present, with the signatures it calls.

ssrl builds vLLM's own OpenAI server app in process (`build_app` + `init_app_state` over its
`AsyncLLM`, with the `Namespace` vLLM's CLI parser makes). These are not public API; when a
vLLM upgrade moves or changes them, this test fails loudly instead of the server at start-up.
Pinned against vllm(-cpu) 0.32.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

pytest.importorskip("vllm")


def _params(func: Any) -> list[str]:
    return [p for p in inspect.signature(func).parameters if p != "self"]


def test_app_builders_exist_with_the_signatures_used() -> None:
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    assert _params(init_app_state)[:4] == ["engine_client", "state", "args", "supported_tasks"]
    assert _params(build_app)[:3] == ["args", "supported_tasks", "model_config"]
    assert _params(make_arg_parser) == ["parser"]
    assert inspect.iscoroutinefunction(init_app_state)


def test_serving_classes_exist_with_their_entry_points() -> None:
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
    from vllm.entrypoints.serve.tokenize.serving import ServingTokenization

    assert _params(OpenAIServingChat.create_chat_completion) == ["request", "raw_request"]
    assert _params(OpenAIServingCompletion.create_completion) == ["request", "raw_request"]
    assert _params(OpenAIServingResponses.create_responses)[:2] == ["request", "raw_request"]
    assert _params(ServingTokenization.create_tokenize) == ["request", "raw_request"]
    assert _params(ServingTokenization.create_detokenize) == ["request", "raw_request"]
    assert _params(OpenAIServingModels.__init__)[:2] == ["engine_client", "base_model_paths"]
    assert _params(OpenAIServingChat.__init__)[:2] == ["engine_client", "models"]


def test_async_llm_offers_what_init_app_state_reads() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    assert inspect.iscoroutinefunction(AsyncLLM.get_supported_tasks)
    assert "model_config" in dir(AsyncLLM) or "model_config" in AsyncLLM.__init__.__code__.co_names


def test_the_parser_takes_ssrl_s_serving_flags() -> None:
    from router.engine.default_model import DEFAULT_MODEL_NAME
    from server.settings import ServeSettings
    from server.vllm_serving import vllm_args

    settings = ServeSettings(enable_auto_tool_choice=True, tool_call_parser="hermes", max_model_len=2048)
    args = vllm_args(settings, "/some/model")
    assert args.model == "/some/model"
    assert args.served_model_name == [DEFAULT_MODEL_NAME]
    assert args.enable_auto_tool_choice is True
    assert args.tool_call_parser == "hermes"
    assert args.api_key is None
    assert args.chat_template is None


def test_the_known_request_fields_are_vllm_s() -> None:
    # server/request_fields.py writes vLLM's field sets out (remote mode has no vLLM); a field
    # vLLM adds would be refused as unknown until it is listed.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from server.request_fields import VLLM_CHAT_FIELDS, VLLM_COMPLETION_FIELDS

    assert set(ChatCompletionRequest.model_fields) == VLLM_CHAT_FIELDS
    assert set(CompletionRequest.model_fields) == VLLM_COMPLETION_FIELDS


def test_every_vllm_field_ssrl_does_not_serve_has_a_rule() -> None:
    # A vLLM field outside ssrl's own request models is forwarded or refused, never dropped.
    from server.protocol import ChatCompletionRequest, CompletionRequest
    from server.request_fields import VLLM_CHAT_FIELDS, VLLM_COMPLETION_FIELDS
    from server.vllm_serving import SELF_SEARCH_UNSUPPORTED

    for vllm_fields, own in (
        (VLLM_CHAT_FIELDS, ChatCompletionRequest),
        (VLLM_COMPLETION_FIELDS, CompletionRequest),
    ):
        unserved = vllm_fields - set(own.model_fields) - set(SELF_SEARCH_UNSUPPORTED)
        assert unserved == set(), unserved
