"""One rule on every path, against the real engine (issue 29): a server started with
--max-tokens-limit and keys, under --openai-serving auto, where some requests are answered by
ssrl's own serving and some by vLLM's serving layer in process.

- The differential check: every route that reaches the engine, sent without a budget,
  generates at most the limit (vLLM's layer would take what the context has left).
- Keys: a caller without one reaches the probes only.
- Bad input that vLLM's layer answered 500 (integers past 64 bits) or that no parser can read
  (not UTF-8, nested past the parser's stack) is a 400 in OpenAI's shape.
- vLLM's own request fields are forwarded, not dropped.
- Property-based requests for the forwarded routes: never a 5xx (tests/e2e/forwarded_fuzz.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import (
    API_KEY,
    ENV,
    RunningServer,
    _free_port,
    _start,
    _stop,
    _wait_healthy,
    server_command,
)
from tests.e2e.forwarded_fuzz import FIELDS, fuzz_forwarded

pytestmark = pytest.mark.engine

LIMIT = 24
M = "capped"
LONG = "Count from 1 to 500, separated by commas."
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    port = _free_port()
    log = tmp_path_factory.mktemp("ssrl-capped") / "server.log"
    # The session server's flags (keys, body limit, context), under its own name and a cap.
    argv = [*server_command(port), "--served-model-name", M, "--max-tokens-limit", str(LIMIT)]
    process = _start(argv, log, ENV)
    running = RunningServer(f"http://127.0.0.1:{port}", API_KEY, log, process)
    try:
        _wait_healthy(running, 420)
        yield running
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def client(capped: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=capped.base_url, headers=capped.auth_headers, timeout=180) as c:
        yield c


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": M, "messages": [{"role": "user", "content": LONG}], **fields}


OFF = {"self_search": {"enabled": False}}
WEB_SEARCH = [{"type": "web_search"}]

# Route, body, and who answers it under `auto`. None of them sets a budget.
UNBUDGETED: dict[str, tuple[str, dict[str, Any]]] = {
    "chat, ssrl's plain serving": (CHAT, chat(**OFF)),
    "chat, vLLM's layer (ignore_eos)": (CHAT, chat(ignore_eos=True, **OFF)),
    "chat, vLLM's layer (top_k)": (CHAT, chat(top_k=40, **OFF)),
    "chat, vLLM's layer (logit_bias)": (CHAT, chat(logit_bias={"2": -100}, ignore_eos=True, **OFF)),
    "chat, vLLM's layer (tools)": (
        CHAT,
        chat(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}], ignore_eos=True, **OFF
        ),
    ),
    "chat, self-search": (CHAT, chat(self_search={"policy": "never"})),
    "completions, ssrl's serving (max_tokens null)": (
        "/v1/completions",
        {"model": M, "prompt": LONG, "max_tokens": None},
    ),
    "completions, vLLM's layer (max_tokens null)": (
        "/v1/completions",
        {"model": M, "prompt": LONG, "max_tokens": None, "ignore_eos": True},
    ),
    "responses, vLLM's layer": ("/v1/responses", {"model": M, "input": LONG}),
    "responses, web_search (self-search)": (
        "/v1/responses",
        {"model": M, "input": LONG, "tools": WEB_SEARCH, "self_search": {"policy": "never"}},
    ),
}


def generated(body: dict[str, Any]) -> int:
    usage = body["usage"]
    return int(usage["output_tokens"] if "output_tokens" in usage else usage["completion_tokens"])


@pytest.mark.parametrize("case", list(UNBUDGETED))
def test_an_omitted_budget_is_capped_on_every_route(client: httpx.Client, case: str) -> None:
    path, body = UNBUDGETED[case]
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    tokens = generated(response.json())
    assert 0 < tokens <= LIMIT, (case, tokens)


def test_a_streamed_forwarded_chat_is_capped_too(client: httpx.Client) -> None:
    body = chat(stream=True, stream_options={"include_usage": True}, ignore_eos=True, **OFF)
    with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    usage = json.loads(events[-2])["usage"]
    assert events[-1] == "[DONE]"
    assert 0 < usage["completion_tokens"] <= LIMIT


def test_a_budget_over_the_limit_is_refused_on_every_route(client: httpx.Client) -> None:
    for path, body, field in (
        (CHAT, chat(max_tokens=LIMIT + 1, ignore_eos=True, **OFF), "max_tokens"),
        (CHAT, chat(max_completion_tokens=LIMIT + 1, **OFF), "max_completion_tokens"),
        ("/v1/responses", {"model": M, "input": "Hi", "max_output_tokens": LIMIT + 1}, "max_output_tokens"),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field


# ----- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/tokenize", {"model": M, "prompt": "Hi"}),
        ("POST", "/detokenize", {"model": M, "tokens": [1, 2]}),
        ("GET", "/version", None),
        ("POST", "/v1/responses", {"model": M, "input": "Hi", "max_output_tokens": 2}),
    ],
)
def test_engine_and_tokenizer_routes_need_the_key(
    capped: RunningServer, client: httpx.Client, method: str, path: str, body: Any
) -> None:
    with httpx.Client(base_url=capped.base_url, timeout=60) as anonymous:
        keyless = anonymous.request(method, path, json=body)
        assert keyless.status_code == 401, keyless.text
        assert keyless.json()["error"]["code"] == "invalid_api_key"
        assert anonymous.get("/health").status_code == 200
    assert client.request(method, path, json=body).status_code == 200


def test_a_tokenize_body_has_its_own_limit(client: httpx.Client) -> None:
    huge = {"model": M, "prompt": "word " * 100_000}  # 500 KB: under the server's --max-request-bytes
    response = client.post("/tokenize", json=huge)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"


# ----- bad input through vLLM's layer ---------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_integers_past_64_bits_are_400_not_500(client: httpx.Client, path: str) -> None:
    fields = f'"top_k": {2**64}, "ignore_eos": true, "max_tokens": 2'
    base = (
        '"messages": [{"role": "user", "content": "Hi"}], "self_search": {"enabled": false}'
        if path == CHAT
        else '"prompt": "Hi"'
    )
    raw = f'{{"model": "{M}", {base}, {fields}}}'.encode()
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "top_k"


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/responses", "/tokenize"])
@pytest.mark.parametrize(
    "raw",
    [b"[" * 20_000 + b"]" * 20_000, b'{"model": "capped", "input": "\xff"}'],
    ids=["deeply-nested", "not-utf8"],
)
def test_unparseable_bodies_are_openai_shaped_400s(client: httpx.Client, path: str, raw: bytes) -> None:
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_vllm_s_own_fields_are_forwarded(client: httpx.Client) -> None:
    response = client.post(CHAT, json=chat(max_tokens=2, cache_salt="tenant-a", priority=0, **OFF))
    assert response.status_code == 200, response.text
    refused = client.post(CHAT, json=chat(max_tokens=2, cache_salt="tenant-a"))  # self-search on
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "cache_salt"


# ----- property-based requests for the forwarded routes ---------------------------------------


@pytest.mark.parametrize("path", list(FIELDS))
def test_forwarded_routes_never_answer_5xx(client: httpx.Client, path: str) -> None:
    fuzz_forwarded(client, M, path)
