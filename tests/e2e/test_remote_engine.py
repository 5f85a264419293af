"""Remote engine mode: ssrl routes in front of a real `vllm.entrypoints.openai.api_server`.

The in-process and the remote engine run the same checkpoint, but vLLM on CPU is not
bit-stable across requests, so they are compared on what is deterministic by construction
(the prompt the engine receives, decisions forced by the policy, the trace's structure),
never on generated text or entropy values.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from router.tags import INFORMATION, SEARCH, extract_last_answer, find_tag_blocks
from tests.conftest import RunningServer, _stop, start_router

QUESTION = "Who painted the Mona Lisa?"


@pytest.fixture(scope="module")
def remote_pair(server: RunningServer, upstream: RunningServer, tmp_path_factory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("router") / "ssrl.log"
    running = start_router(upstream, server.api_key, log)
    try:
        yield running
    finally:
        _stop(running.process)


def _ask(base_url: str, api_key: str, model: str, policy: str | None, **kwargs):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=120)
    extension = {"policy": policy} if policy else {"enabled": False}
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        extra_body={"self_search": extension},
        **kwargs,
    )


def _loop_shape(response, policy: str) -> tuple:
    """What one loop response must show whatever the model wrote; returns its structure."""
    choice = response.choices[0]
    trace = choice.model_extra["self_search"]
    reasoning = choice.message.model_extra["reasoning"]
    (search,) = trace["searches"]
    assert search["decision"] == ("external" if policy == "always" else "internal")
    # Entropies come from the engine's logprobs keyed by token id: one per query token.
    entropy = search["entropy"]
    assert entropy["tokens"] > 0 and len(entropy["per_token"]) == entropy["tokens"]
    assert entropy["max"] >= entropy["mean"] >= 0 and 0 < entropy["min_prob"] <= 1
    queries = [b.content(reasoning).strip() for b in find_tag_blocks(reasoning) if b.tag == SEARCH]
    assert queries == [search["query"]]
    blocks = [b.content(reasoning) for b in find_tag_blocks(reasoning) if b.tag == INFORMATION]
    assert [b.strip() for b in blocks] == [search["information"]]
    assert choice.message.content == extract_last_answer(reasoning)
    tags = [b.tag for b in find_tag_blocks(reasoning)]
    return (
        tags,
        search["decision"],
        trace["turns"],
        trace["external_calls"],
        trace["internal_fills"],
        trace["answered"],
        [d["url"] for d in search["documents"]] if policy == "always" else [],
    )


def test_remote_engine_receives_the_same_prompt(remote_pair, server, model_name):
    # The chat template is applied by ssrl in both modes: the engine sees the same tokens.
    remote = _ask(remote_pair.base_url, remote_pair.api_key, model_name, None, max_tokens=1)
    local = _ask(server.base_url, server.api_key, model_name, None, max_tokens=1)
    assert remote.usage.prompt_tokens == local.usage.prompt_tokens > 0


@pytest.mark.parametrize("policy", ["always", "never"])
def test_remote_engine_runs_the_same_loop(remote_pair, server, model_name, policy):
    remote = _ask(remote_pair.base_url, remote_pair.api_key, model_name, policy)
    local = _ask(server.base_url, server.api_key, model_name, policy)
    remote_shape, local_shape = _loop_shape(remote, policy), _loop_shape(local, policy)
    # Same structure and forced decisions; the documents (which depend on the query the
    # model wrote) are only compared for shape.
    assert remote_shape[:-1] == local_shape[:-1]
    for urls in (remote_shape[-1], local_shape[-1]):
        assert (len(urls) >= 1) if policy == "always" else (urls == [])


def test_remote_engine_health_and_plain_chat(remote_pair, http, model_name):
    assert http.get(remote_pair.base_url + "/health").status_code == 200
    client = openai.OpenAI(
        base_url=remote_pair.base_url + "/v1", api_key=remote_pair.api_key, max_retries=0, timeout=120
    )
    stream = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"self_search": {"enabled": False}},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        else:
            usage = chunk.usage
    assert text and usage is not None and 0 < usage.completion_tokens <= 8


def test_sigterm_drains_in_flight_requests_then_exits(upstream, server, model_name, tmp_path):
    router = start_router(upstream, server.api_key, tmp_path / "ssrl.log", "--shutdown-grace", "60")
    headers = {"Authorization": f"Bearer {server.api_key}"}
    body = {
        "model": model_name,
        "prompt": "Count from 1 to 1000: 1, 2, 3, 4,",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    try:
        with httpx.Client(base_url=router.base_url, timeout=120) as client:
            assert client.get("/ready").status_code == 200
            with client.stream("POST", "/v1/completions", json=body, headers=headers) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert first != "data: [DONE]"
                router.process.send_signal(signal.SIGTERM)
                # Readiness turns false at once; new work is refused with a retry hint.
                assert _poll(lambda: client.get("/ready").status_code == 503)
                refused = client.post(
                    "/v1/completions",
                    headers=headers,
                    json={"model": model_name, "prompt": "hi", "max_tokens": 2},
                )
                assert refused.status_code == 503
                assert refused.headers["Retry-After"].isdigit()
                assert refused.json()["error"]["code"] == "server_shutting_down"
                assert client.get("/health").status_code == 200  # liveness holds while draining
                rest = [line for line in lines if line.startswith("data: ")]
            # The request in flight ran to its end.
            assert rest[-1] == "data: [DONE]"
            finish = [
                json.loads(line[6:])["choices"][0].get("finish_reason")
                for line in rest[:-1]
                if json.loads(line[6:]).get("choices")
            ]
            assert finish[-1] in ("length", "stop")
        router.process.wait(timeout=60)
        assert router.process.poll() is not None
        assert "draining 1 request(s)" in router.log_tail(200)
    finally:
        _stop(router.process)


def _poll(check, attempts: int = 50, interval: float = 0.1) -> bool:
    for _ in range(attempts):
        if check():
            return True
        time.sleep(interval)
    return False
