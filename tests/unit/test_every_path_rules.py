"""One rule on every path (issue 29): keys, body limits, token defaults and bad JSON hold for
the routes vLLM's serving layer answers as they do for ssrl's own.

The in-process forwarding is driven with a stand-in serving object (tests/unit/
test_parity_dispatch.py); what vLLM itself does with the cap is checked against the real engine
in tests/e2e/test_caps_every_path.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from server.auth import PROBE_PATHS, needs_key
from server.errors import APIError
from server.json_body import NOT_JSON, parse_json_body, parse_json_object
from server.limits import TOKENIZER_MIN_BODY_BYTES, tokenizer_body_limit
from server.vllm_serving import (
    SELF_SEARCH_UNSUPPORTED,
    cap_default_max_tokens,
    out_of_range_integer,
    with_default_budget,
)
from tests.unit.test_http_layer import AUTH, CHAT, COMPLETIONS, MODEL, chat, drive, post
from tests.unit.test_parity_dispatch import _drive_with, _Echo, engine, error_of

DEEP = b"[" * 30_000 + b"]" * 30_000  # within every body limit, far past any parser's stack
NOT_UTF8 = b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}'

# ----- JSON bodies: client errors are 400s, never a RecursionError's 500 ---------------------


def test_parse_json_body_sorts_what_is_not_json_from_what_cannot_be_parsed() -> None:
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    assert parse_json_body(b"{nope") is NOT_JSON
    for bad, words in ((DEEP, "nested too deeply"), (NOT_UTF8, "not valid UTF-8")):
        with pytest.raises(APIError) as caught:
            parse_json_body(bad)
        assert caught.value.status == 400 and words in caught.value.message
        assert caught.value.code == "invalid_json"
    assert parse_json_object(b"[1]") is None and parse_json_object(b"") is None


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/v1/responses", "/tokenize"])
@pytest.mark.parametrize("payload", [DEEP, NOT_UTF8], ids=["deep", "not-utf8"])
def test_unparseable_bodies_are_openai_shaped_400s_on_every_path(path: str, payload: bytes) -> None:
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        return await client.post(path, content=payload, headers=headers)

    for mode in ("vllm", "auto", "ssrl"):
        response = _drive_with(serving, body, openai_serving=mode, max_request_bytes=1_000_000)
        error = error_of(response, 400)
        assert set(error) == {"message", "type", "param", "code"}, (mode, error)
        assert error["type"] == "invalid_request_error"
    assert serving.bodies == []  # nothing unparseable reaches vLLM's layer


# ----- keys: only the probes are open --------------------------------------------------------


class _EchoAny(_Echo):
    """The stand-in for routes whose requests may have no body (GET /version)."""

    async def forward(self, request: Any, body: bytes) -> Any:
        return await super().forward(request, body or b"null")


def test_only_the_probes_are_open() -> None:
    assert {"/health", "/ready", "/metrics"} == PROBE_PATHS
    for path in ("/tokenize", "/detokenize", "/version", "/docs", "/openapi.json", "/v1/models", "/x"):
        assert needs_key(path), path


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"), ("GET", "/openapi.json")],
)
def test_tokenizer_and_version_routes_need_the_key(method: str, path: str) -> None:
    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        payload = {"model": MODEL, "prompt": "x"} if method == "POST" else None
        keyless = await client.request(method, path, json=payload, headers={"Authorization": ""})
        keyed = await client.request(method, path, json=payload, headers=AUTH)
        return [keyless, keyed]

    keyless, keyed = _drive_with(_EchoAny(), body)
    assert error_of(keyless, 401)["code"] == "invalid_api_key"
    assert keyed.status_code == 200, keyed.text


def test_probes_answer_without_a_key() -> None:
    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.get(p, headers={"Authorization": ""}) for p in sorted(PROBE_PATHS)]

    for response in drive(engine(), body):
        assert response.status_code != 401, response.text


def test_tokenizer_routes_count_against_the_key_s_rate_limit() -> None:
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> list[int]:
        return [
            (await client.post("/tokenize", json={"model": MODEL, "prompt": "x"})).status_code
            for _ in range(4)
        ]

    statuses = _drive_with(serving, body, rate_limit=6)  # a burst of one request
    assert statuses[0] == 200 and 429 in statuses[1:], statuses


# ----- the tokenizer routes' own body limit --------------------------------------------------


def test_tokenizer_body_limit_follows_the_context() -> None:
    assert tokenizer_body_limit(128) == TOKENIZER_MIN_BODY_BYTES
    assert tokenizer_body_limit(32_768) == 8 * 32_768


def test_a_tokenize_body_over_its_limit_is_413_where_chat_takes_it() -> None:
    serving = _Echo()
    # The scripted engine's context is small: its tokenizer bound is the 64 KiB floor.
    prompt = "word " * (TOKENIZER_MIN_BODY_BYTES // 5 + 100)

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post("/tokenize", json={"model": MODEL, "prompt": prompt}),
            await client.post("/tokenize", json={"model": MODEL, "prompt": "short"}),
        ]

    too_big, short = _drive_with(serving, body, max_request_bytes=4_000_000)
    assert error_of(too_big, 413)["code"] == "request_too_large"
    assert str(TOKENIZER_MIN_BODY_BYTES) in error_of(too_big, 413)["message"]
    assert short.status_code == 200


# ----- an omitted budget means the same on every path ----------------------------------------


def test_vllm_s_serving_layer_gets_the_limit_as_its_ceiling() -> None:
    config = SimpleNamespace(override_generation_config={})
    cap_default_max_tokens(config, 32)
    assert config.override_generation_config == {"max_new_tokens": 32}
    own = SimpleNamespace(override_generation_config={"max_new_tokens": 8, "temperature": 0.5})
    cap_default_max_tokens(own, 32)  # an operator's smaller default stays
    assert own.override_generation_config == {"max_new_tokens": 8, "temperature": 0.5}
    untouched = SimpleNamespace(override_generation_config={})
    cap_default_max_tokens(untouched, None)
    assert untouched.override_generation_config == {}


def test_vllm_s_serving_classes_read_the_ceiling() -> None:
    # The coupling cap_default_max_tokens relies on: vLLM's chat serving takes
    # override_generation_config's max_new_tokens as its override of every budget.
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

    assert get_max_tokens(2048, None, 10, {}, override_max_tokens=32) == 32
    assert get_max_tokens(2048, None, 2030, {}, override_max_tokens=32) == 18


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (CHAT, {}, {"max_tokens": 32}),
        (CHAT, {"max_tokens": None}, {"max_tokens": 32}),
        (CHAT, {"max_completion_tokens": 8}, {"max_completion_tokens": 8}),
        (CHAT, {"max_tokens": 8}, {"max_tokens": 8}),
        (COMPLETIONS, {}, {}),  # vLLM's default of 16 is within the limit
        (COMPLETIONS, {"max_tokens": None}, {"max_tokens": 32}),
        ("/v1/responses", {}, {"max_output_tokens": 32}),
        ("/tokenize", {}, {}),
    ],
)
def test_remote_requests_get_the_limit_as_their_default(
    path: str, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert with_default_budget(path, body, 32) == expected
    assert with_default_budget(path, body, None) == body


def test_a_limit_below_vllm_s_completion_default_applies_too() -> None:
    assert with_default_budget(COMPLETIONS, {}, 8) == {"max_tokens": 8}


# ----- vLLM's own request fields: honoured (forwarded) or 400, never dropped -----------------

VLLM_ONLY = {"priority": 1, "kv_transfer_params": {"a": 1}, "cache_salt": "salt", "vllm_xargs": {"a": 1}}


@pytest.mark.parametrize(("field", "value"), list(VLLM_ONLY.items()))
def test_vllm_only_fields_are_forwarded_or_refused(field: str, value: Any) -> None:
    assert field in SELF_SEARCH_UNSUPPORTED
    plain = error_of(post(engine(), CHAT, chat(**{field: value})), 400)  # ssrl's own serving
    assert (plain["param"], plain["code"]) == (field, "unsupported_parameter")
    searching = error_of(post(engine(), CHAT, chat(**{field: value}), self_search=True, search="none"), 400)
    assert searching["param"] == field
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(CHAT, json=chat(**{field: value}))

    forwarded = _drive_with(serving, body, openai_serving="auto")
    assert forwarded.json() == {"forwarded": CHAT}
    assert serving.bodies[0][field] == value


def test_default_priority_is_not_a_request_for_vllm() -> None:
    assert post(engine(), CHAT, chat(priority=0)).status_code == 200


def test_the_forwarded_body_is_what_the_client_sent() -> None:
    # The stand-in gets the body parsed again: no re-encoding loses a field.
    serving = _Echo()
    sent = chat(top_k=3, cache_salt="s")

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            CHAT, content=json.dumps(sent).encode(), headers={"Content-Type": "application/json"}
        )

    _drive_with(serving, body, openai_serving="auto")
    assert serving.bodies == [sent]


# ----- integers the engine cannot carry -------------------------------------------------------


def test_out_of_range_integers_are_found_by_their_path() -> None:
    assert out_of_range_integer({"top_k": 2**64}) == "top_k"
    assert out_of_range_integer({"a": [1, {"b": -(2**63) - 1}]}) == "a[1].b"
    assert out_of_range_integer({"seed": 2**63 - 1, "n": True, "x": 1.5e300}) is None
    deep: Any = 2**70
    for _ in range(5_000):
        deep = [deep]
    assert out_of_range_integer(deep) == "[0]" * 5_000


def test_a_huge_integer_is_a_400_before_vllm_s_layer() -> None:
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        raw = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "top_k": %d}'
        return await client.post(
            CHAT, content=raw % (MODEL.encode(), 2**64), headers={"Content-Type": "application/json"}
        )

    error = error_of(_drive_with(serving, body, openai_serving="auto"), 400)
    assert (error["param"], error["code"]) == ("top_k", "invalid_value")
    assert serving.bodies == []


# ----- what ssrl's own serving refuses, vLLM's layer never sees ---------------------------------

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "get weather", "parameters": WEATHER_PARAMETERS},
                    }
                ]
            },
            "tools[0].function.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#"}},
                }
            },
            "response_format",
        ),
    ],
    ids=["tool-name", "self-referencing-schema"],
)
def test_forwarded_chat_meets_ssrl_s_tool_and_schema_rules(fields: dict[str, Any], param: str) -> None:
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(CHAT, json=chat(**fields, self_search={"enabled": False}))

    error = error_of(_drive_with(serving, body, openai_serving="vllm"), 400)
    assert error["param"] == param
    assert serving.bodies == []


# ----- fields nobody defines: one 400, on every path ------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "vllm", "ssrl"])
@pytest.mark.parametrize("self_search", [False, True])
def test_an_unknown_field_is_400_naming_it_on_every_path(mode: str, self_search: bool) -> None:
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post(CHAT, json=chat(totally_unknown_param=1, self_search={"enabled": self_search})),
            await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "totally_unknown_param": 1}),
        ]

    for response in _drive_with(serving, body, openai_serving=mode):
        error = error_of(response, 400)
        assert (error["param"], error["code"]) == ("totally_unknown_param", "unknown_parameter")
        assert error["message"] == "Unrecognized request argument supplied: totally_unknown_param"
    assert serving.bodies == []


def test_identifying_fields_are_honoured_by_doing_nothing() -> None:
    serving = _Echo()
    ids = {"metadata": {"run": "1"}, "safety_identifier": "u1", "prompt_cache_key": "k", "store": False}

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post(CHAT, json=chat(**ids, top_k=3)),  # forwarded: vLLM never sees them
            await client.post(CHAT, json=chat(**ids)),  # ssrl's plain chat
            await client.post(CHAT, json=chat(store=True)),
        ]

    forwarded, plain, stored = _drive_with(serving, body, openai_serving="auto")
    assert forwarded.json() == {"forwarded": CHAT} and serving.bodies == [chat(top_k=3)]
    assert plain.status_code == 200, plain.text
    assert (error_of(stored, 400)["param"], error_of(stored, 400)["code"]) == (
        "store",
        "unsupported_parameter",
    )


def test_vllm_s_other_fields_are_forwarded_not_dropped() -> None:
    serving = _Echo()

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post(CHAT, json=chat(use_beam_search=True)),
            await client.post(CHAT, json=chat(return_token_ids=True)),
        ]

    for response in _drive_with(serving, body, openai_serving="auto"):
        assert response.json() == {"forwarded": CHAT}
    plain = error_of(post(engine(), CHAT, chat(use_beam_search=True)), 400)
    assert (plain["param"], plain["code"]) == ("use_beam_search", "unsupported_parameter")
