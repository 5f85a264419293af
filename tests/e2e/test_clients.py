"""The clients against the real server: the Python client, `ssrl chat`, and every example
of docs/examples.md (run as written, with SSRL_BASE_URL / SSRL_API_KEY pointing here).

Generations are short: one forced search (`policy always`, `max_turns 1`), greedy.
vLLM on CPU is not bit-stable across requests (greedy output can differ between two
identical requests), so every test compares parts of ONE response with each other: the
typed object with the raw JSON it was parsed from, a stream's deltas with the trace the same
stream carried, the CLI's plain output with itself. The answer is always read with the
server's own rule, `router.tags.extract_last_answer`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import httpx
import pytest

from clients.client import (
    AnswerDelta,
    AsyncSSRLClient,
    ReasoningDelta,
    SearchDecided,
    SSRLAPIError,
    SSRLClient,
    TraceEvent,
    Usage,
)
from router.tags import SEARCH, extract_last_answer, find_tag_blocks
from tests.conftest import REPO_ROOT, RunningServer

QUESTION = "Who painted the Mona Lisa?"
SEED = 11
# The request every test makes: one forced external search, greedy.
OPTIONS: dict[str, Any] = {"policy": "always", "max_turns": 1}
EXAMPLES = REPO_ROOT / "docs" / "examples"
RUN_TIMEOUT_S = 300


@pytest.fixture
def client(server: RunningServer):
    with SSRLClient(server.base_url, server.api_key, timeout=300, max_retries=0) as c:
        yield c


def child_env(server: RunningServer, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "SSRL_MODEL")
    }
    env.update(
        {
            "SSRL_BASE_URL": server.base_url,
            "SSRL_API_KEY": server.api_key,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "PYTHONIOENCODING": "utf-8",
        }
    )
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        encoding="utf-8",
        check=False,
    )


# ----- the Python client ------------------------------------------------------------------


def search_queries(transcript: str) -> list[str]:
    """The queries of the top-level `<search>` blocks, stripped as the trace reports them."""
    return [b.content(transcript).strip() for b in find_tag_blocks(transcript) if b.tag == SEARCH]


def assert_typed_equals_raw(result: Any) -> None:
    """The typed `ChatResult` is exactly the raw JSON of the same response, and its answer
    is the last top-level `<answer>` of its own transcript."""
    raw = result.raw
    raw_choice = raw["choices"][0]
    raw_trace = raw_choice["self_search"]
    assert result.model == raw["model"]
    assert result.answer == raw_choice["message"]["content"]
    assert result.reasoning == raw_choice["message"]["reasoning"]
    assert result.answer == extract_last_answer(result.reasoning)
    assert result.finish_reason == raw_choice["finish_reason"]
    assert result.usage is not None and result.usage.model_dump() == raw["usage"]
    trace = result.trace
    assert trace is not None
    assert [(s.query, s.decision) for s in trace.searches] == [
        (s["query"], s["decision"]) for s in raw_trace["searches"]
    ]
    assert [d.title for d in trace.searches[0].documents] == [
        d["title"] for d in raw_trace["searches"][0]["documents"]
    ]
    assert trace.searches[0].entropy.per_token == raw_trace["searches"][0]["entropy"]["per_token"]
    assert (trace.external_calls, trace.internal_fills, trace.turns, trace.answered) == (
        raw_trace["external_calls"],
        raw_trace["internal_fills"],
        raw_trace["turns"],
        raw_trace["answered"],
    )
    assert [c.url for c in result.citations] == [
        a["url_citation"]["url"] for a in raw_choice["message"]["annotations"]
    ]
    # The typed trace is lossless: dumped back, it is the JSON the server sent.
    assert trace.model_dump(exclude={"vote"}) == raw_trace
    # Forced by the policy, whatever the model wrote.
    assert trace.searches[0].decision == "external" and trace.turns == 1


def test_client_chat_equals_the_raw_answer(client: SSRLClient, model_name: str) -> None:
    result = client.chat(QUESTION, temperature=0, seed=SEED, **OPTIONS)
    assert result.model == model_name  # the default model is the server's first
    assert_typed_equals_raw(result)


def test_async_client_equals_the_raw_answer(server: RunningServer) -> None:
    async def go():
        async with AsyncSSRLClient(server.base_url, server.api_key, timeout=300) as c:
            return await c.chat(QUESTION, temperature=0, seed=SEED, **OPTIONS)

    assert_typed_equals_raw(asyncio.run(go()))


def test_stream_events_arrive_in_order(client: SSRLClient) -> None:
    events = list(client.stream(QUESTION, temperature=0, seed=SEED, **OPTIONS))
    kinds = [type(e) for e in events]
    assert kinds[0] is ReasoningDelta
    searches = [i for i, e in enumerate(events) if isinstance(e, SearchDecided)]
    assert len(searches) == 1
    info = next(
        i for i, e in enumerate(events) if isinstance(e, ReasoningDelta) and "<information>" in e.text
    )
    assert searches[0] < info  # decided before its information is written
    answers = [i for i, e in enumerate(events) if isinstance(e, AnswerDelta)]
    assert answers and answers[0] > info
    assert kinds[-2:] == [TraceEvent, Usage]
    trace_event, usage = events[-2], events[-1]
    assert isinstance(trace_event, TraceEvent) and isinstance(usage, Usage)
    # The reassembled stream agrees with the trace the same stream carried.
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    answer = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert answer == extract_last_answer(reasoning)
    record = events[searches[0]].record  # type: ignore[union-attr]
    trace = trace_event.trace
    assert trace is not None and trace.external_calls == 1 and trace.answered
    assert [(s.query, s.decision) for s in trace.searches] == [(record.query, record.decision)]
    assert record.decision == "external" and record.documents
    assert [d.title for d in trace.searches[0].documents] == [d.title for d in record.documents]
    assert search_queries(reasoning) == [record.query]
    assert f"<information>{trace.searches[0].information}</information>" in reasoning
    assert trace_event.finish_reason in ("stop", "length")
    assert [c.url for c in trace_event.citations] == [d.url for d in record.documents]
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_plain_generation_has_no_trace(client: SSRLClient) -> None:
    result = client.chat(QUESTION, enabled=False, temperature=0, max_tokens=8)
    raw = result.raw["choices"][0]
    assert result.trace is None and "self_search" not in raw
    assert result.answer == raw["message"]["content"] and result.answer
    assert result.usage is not None and result.usage.completion_tokens <= 8


def test_search_and_retrieve_match_raw_http(
    client: SSRLClient, http: httpx.Client, auth_headers: dict[str, str]
) -> None:
    raw = http.get("/v1/search", params={"q": "Mona Lisa", "k": 2}, headers=auth_headers).json()
    found = client.search("Mona Lisa", k=2)
    assert [(h.title, h.url) for h in found.data] == [(h["title"], h["url"]) for h in raw["data"]]
    assert found.data[0].title == "Mona Lisa" and found.backend == "local"
    raw_r = http.post(
        "/retrieve", json={"queries": ["Mona Lisa", "capital of France"], "topk": 2}, headers=auth_headers
    ).json()
    docs = client.retrieve(["Mona Lisa", "capital of France"], topk=2)
    assert [[d.contents for d in row] for row in docs] == [
        [d["contents"] for d in row] for row in raw_r["result"]
    ]
    assert docs[0][0].title == "Mona Lisa"


def test_client_reports_server_errors(server: RunningServer) -> None:
    with SSRLClient(server.base_url, "wrong-key") as bad, pytest.raises(SSRLAPIError) as info:
        bad.search("Mona Lisa")
    assert info.value.status_code == 401 and info.value.type == "authentication_error"
    with SSRLClient(server.base_url, server.api_key) as c, pytest.raises(SSRLAPIError) as info:
        c.chat("hi", max_turns=99)
    assert info.value.status_code == 400 and info.value.param == "self_search.max_turns"


# ----- `ssrl chat` --------------------------------------------------------------------------


def chat_cmd(server: RunningServer, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clients.cli",
        "chat",
        "--base-url",
        server.base_url,
        "--api-key",
        server.api_key,
        QUESTION,
        "--policy",
        "always",
        "--max-turns",
        "1",
        "--temperature",
        "0",
        "--seed",
        str(SEED),
        *extra,
    ]


def test_cli_piped_output_is_plain(server: RunningServer) -> None:
    done = run(chat_cmd(server), child_env(server, TERM="dumb"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b[" not in out
    # The plain output prints the transcript as it streams, with the search block after its
    # `</search>`: everything below is checked against the same output.
    (header,) = re.findall(r"^\[search 1\] (.*)$", out, flags=re.MULTILINE)
    assert search_queries(out) == [header]
    assert "decision: external" in out and "entropy mean" in out
    listed = re.findall(r"^  - (.+?) <https://[^>]+>$", out, flags=re.MULTILINE)
    assert listed, out
    for i, title in enumerate(listed, start=1):
        assert f"Doc {i}(Title: {title})" in out
    answers = [line for line in out.splitlines() if line.startswith("Answer: ")]
    assert answers == ["Answer: " + (extract_last_answer(out) or "")]


def test_cli_json_prints_the_response(server: RunningServer) -> None:
    done = run(chat_cmd(server, "--json"), child_env(server))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    choice = data["choices"][0]
    search = choice["self_search"]["searches"][0]
    assert search["decision"] == "external"
    assert choice["message"]["content"] == extract_last_answer(choice["message"]["reasoning"])
    assert [a["url_citation"]["url"] for a in choice["message"]["annotations"]] == [
        d["url"] for d in search["documents"]
    ]


def test_cli_on_a_terminal_is_formatted(server: RunningServer) -> None:
    # FORCE_COLOR makes rich treat the pipe as a terminal, as `--color always` does.
    done = run(chat_cmd(server), child_env(server, FORCE_COLOR="1", TERM="xterm-256color"))
    assert done.returncode == 0, done.stderr
    assert re.search(r"\x1b\[[0-9;]*m", done.stdout), done.stdout[:500]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
    assert "search 1" in plain and "query: " in plain and "decision: external" in plain
    assert "<information>Doc 1(Title: " in plain
    assert "Answer:" in plain


def test_cli_errors_are_one_line(server: RunningServer) -> None:
    env = child_env(server)
    bad_key = run(
        [
            sys.executable,
            "-m",
            "clients.cli",
            "chat",
            "--base-url",
            server.base_url,
            "--api-key",
            "wrong-key",
            QUESTION,
        ],
        env,
    )
    assert bad_key.returncode == 1
    assert bad_key.stderr.count("\n") == 1 and "401" in bad_key.stderr
    assert "Traceback" not in bad_key.stderr
    invalid = run(chat_cmd(server, "--votes", "1000"), env)
    assert invalid.returncode == 1 and "self_search.votes" in invalid.stderr
    assert invalid.stderr.count("\n") == 1


# ----- docs/examples ------------------------------------------------------------------------


EXAMPLE_LINES: dict[str, list[str]] = {
    "openai_chat.py": [
        r"^answer: \S",
        r"^search: '.+' mean entropy [0-9.]+ nats -> external \(",
        r"^  document: \S",
        r"^citation: https://en\.wikipedia\.org/wiki/",
        r"^external calls: 1, self-filled: 0$",
        r"^reasoning starts with <search>: True$",
        r"^usage: \d+ tokens$",
    ],
    "openai_stream.py": [
        r"^<search>",
        r"^\[search\] '.+' -> external, \d document\(s\)$",
        r"^\[trace\] 1 search\(es\), 1 external, finish_reason=\w+$",
        r"^usage: \d+ tokens$",
        r"^answer: \S",
    ],
    "openai_async.py": [
        r"^policy always: decisions \['external'\], answer '.+'$",
        r"^policy never: decisions \['internal'\], answer '.+'$",
    ],
    "ssrl_client.py": [
        r"^answer: \S",
        r"^search: '.+' entropy mean=[0-9.]+ max=[0-9.]+ -> external$",
        r"^  document: .+ https://en\.wikipedia\.org/wiki/",
        r"^citations: \['https://en\.wikipedia\.org/wiki/",
        r"^stream: search decided '.+' -> internal$",
        r"^stream: finished \(\w+\), 1 search\(es\)$",
        r"^stream: usage \d+ tokens$",
        r"^search endpoint: local \['Mona Lisa', ",
        r"^retrieve: \[\['Mona Lisa', ",
    ],
    "ssrl_client_async.py": [
        r"^async stream: search '.+' -> external$",
        r"^async stream answer: \S",
        r"^async chat answer: .+ \| decisions: \['internal'\]$",
    ],
    "agents_sdk.py": [r"^agent answer: \S"],
}


def test_every_example_is_tested() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(EXAMPLE_LINES)
    doc = (REPO_ROOT / "docs" / "examples.md").read_text()
    for name in [*scripts, "curl.sh"]:
        assert f"docs/examples/{name}" in doc, f"{name} is not in docs/examples.md"


def assert_lines(out: str, patterns: list[str]) -> None:
    for pattern in patterns:
        assert re.search(pattern, out, flags=re.MULTILINE), f"no line matches {pattern!r} in:\n{out}"


@pytest.mark.parametrize("script", sorted(EXAMPLE_LINES))
def test_python_example_runs(server: RunningServer, script: str) -> None:
    if script == "agents_sdk.py":
        pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents) is not installed")
    done = run([sys.executable, str(EXAMPLES / script)], child_env(server))
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    assert_lines(done.stdout, EXAMPLE_LINES[script])


@pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("bash") is None, reason="curl and bash are needed"
)
def test_curl_example_runs(server: RunningServer, model_name: str) -> None:
    done = run(["bash", str(EXAMPLES / "curl.sh")], child_env(server, SSRL_MODEL=model_name))
    assert done.returncode == 0, f"curl.sh failed:\n{done.stdout}\n{done.stderr}"
    sections = re.split(r"^== .*$", done.stdout, flags=re.MULTILINE)
    assert len(sections) == 5, done.stdout[:1000]
    chat = json.loads(sections[1])
    assert chat["choices"][0]["self_search"]["searches"][0]["decision"] == "external"
    stream = [line for line in sections[2].splitlines() if line]
    assert stream[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in stream[:-1]]
    kinds = [
        c["choices"][0]["self_search"]["type"]
        for c in chunks
        if c["choices"] and "self_search" in c["choices"][0]
    ]
    assert kinds == ["search", "trace"]
    assert chunks[-1]["usage"]["total_tokens"] > 0
    search = json.loads(sections[3])
    assert search["object"] == "search.result" and search["data"][0]["title"] == "Mona Lisa"
    retrieved = json.loads(sections[4])["result"]
    assert len(retrieved) == 2 and all(len(hits) == 2 for hits in retrieved)
