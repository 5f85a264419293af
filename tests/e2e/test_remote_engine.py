"""Remote engine mode: ssrl routes in front of a real `vllm.entrypoints.openai.api_server`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import REPO_ROOT, RunningServer, _free_port, _stop, _wait_healthy

QUESTION = "Who painted the Mona Lisa?"


def _start(argv: list[str], log_path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


@pytest.fixture(scope="module")
def remote_pair(server: RunningServer, tmp_path_factory) -> Iterator[RunningServer]:
    """A vLLM OpenAI server on the default checkpoint, and an ssrl router in front of it."""
    from router.engine.default_model import ensure_default_checkpoint

    checkpoint = str(ensure_default_checkpoint())
    logs = tmp_path_factory.mktemp("remote")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    vllm_port, ssrl_port = _free_port(), _free_port()
    vllm = _start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
                   "--served-model-name", "upstream", "--port", str(vllm_port), "--host", "127.0.0.1",
                   "--max-model-len", "2048", "--enforce-eager"], logs / "vllm.log", env)
    upstream = RunningServer(f"http://127.0.0.1:{vllm_port}", "", logs / "vllm.log", vllm)
    router = None
    try:
        _wait_healthy(upstream, 420)
        router = _start([sys.executable, "-m", "clients.cli", "serve", "--host", "127.0.0.1",
                         "--port", str(ssrl_port), "--engine-url", upstream.base_url + "/v1",
                         "--api-key", server.api_key], logs / "ssrl.log", env)
        running = RunningServer(f"http://127.0.0.1:{ssrl_port}", server.api_key,
                                logs / "ssrl.log", router)
        _wait_healthy(running, 120)
        yield running
    finally:
        if router is not None:
            _stop(router)
        _stop(vllm)


def _ask(base_url: str, api_key: str, model: str, policy: str):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=120)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        extra_body={"self_search": {"policy": policy}},
    )


@pytest.mark.parametrize("policy", ["always", "never"])
def test_remote_engine_runs_the_same_loop(remote_pair, server, model_name, policy):
    remote = _ask(remote_pair.base_url, remote_pair.api_key, model_name, policy).choices[0]
    local = _ask(server.base_url, server.api_key, model_name, policy).choices[0]
    remote_trace = remote.model_extra["self_search"]
    local_trace = local.model_extra["self_search"]
    # Same checkpoint, greedy decoding: the remote engine must yield the same trajectory,
    # and the entropies come from the remote engine's logprobs keyed by token id.
    assert remote.message.model_extra["reasoning"] == local.message.model_extra["reasoning"]
    assert remote.message.content == local.message.content
    r, l = remote_trace["searches"][0], local_trace["searches"][0]
    assert r["query"] == l["query"] and r["decision"] == l["decision"] == (
        "external" if policy == "always" else "internal")
    assert r["entropy"]["tokens"] == l["entropy"]["tokens"] > 0
    assert r["entropy"]["mean"] == pytest.approx(l["entropy"]["mean"], abs=0.05)


def test_remote_engine_health_and_plain_chat(remote_pair, http, model_name):
    assert http.get(remote_pair.base_url + "/health").status_code == 200
    client = openai.OpenAI(base_url=remote_pair.base_url + "/v1", api_key=remote_pair.api_key,
                           max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"self_search": {"enabled": False}},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        else:
            usage = chunk.usage
    assert text and usage is not None and 0 < usage.completion_tokens <= 8
