"""Client-side loop baseline: ssrl's server-side self-search loop against the same guided
trajectory driven by a client over a plain vLLM OpenAI server.

What agent builders do today (Search-R1's inference script, most agent frameworks): generate
up to `</search>`, call search, append the documents to the text, re-send. This script does
exactly that against `python -m vllm.entrypoints.openai.api_server` (same checkpoint, same
engine flags as ssrl), with ssrl's guided trajectory:

- the same system prompt and worked examples (`router.prompts`), the chat template applied
  once by the client's tokenizer (`add_generation_prompt=True`), the transcript appended as
  text, and every turn sent to `/v1/completions` as one text prompt (the server re-tokenises
  it each time; see `prompt_text`);
- the same turns, stop strings, caps and penalties as `router.loop` in guided mode: the
  server-written `<search>`, the model's query up to `</search>` or a newline (top-20
  logprobs requested, as ssrl does to measure the query's entropy), `<information>` with the
  local BM25 index's documents (policy `always`: 1 document of 300 characters, guided
  defaults) or the model's own fill (policy `never`), then `<answer>` and a one-line answer;
- the same search service (built from `ServeSettings()`: the local index behind the same
  cache and resilience layers), called from the client.

Both servers run for the whole benchmark and the rounds interleave (ssrl, client loop,
client loop, ssrl, ... per policy and level) so that machine load hits both alike. Every
request is non-streaming, temperature 0. A trajectory's engine tokens are the prompt plus
completion tokens summed over its engine calls (`usage` of the one ssrl response; the sum of
the client's per-call `usage`). The prefix-cache counters of both servers' `/metrics`
(`vllm:prefix_cache_queries`/`_hits`) give the prompt tokens actually prefilled.

Then, with the servers stopped, an in-process part explains the loop overhead of a
model-filled trajectory against one single pass of the same token count (bench/loop.py's
measure), split into the loop's own Python work, the cost of the query's logprobs, the fixed
cost of the two extra engine calls and the extra prefill (vLLM's CPU KV block is 128 tokens
and only full blocks are cached: each resumption re-prefills the partial last block).

    .venv/bin/python -m bench.client_loop
    .venv/bin/python -m bench.client_loop --concurrency 1,8 --rounds 1 --overhead-questions 0
    .venv/bin/python -m bench.client_loop --overhead-only --overhead-questions 6   # into the saved JSON
    .venv/bin/python -m bench.client_loop --render-from bench/results/client_loop.json \
        --explanation-file why.md   # rewrite the section ("Why", then `<!-- overhead -->` notes)

Writes bench/results/client_loop.json and the "client_loop" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BENCHMARKS_MD,
    ROOT,
    load_line,
    machine_info,
    machine_markdown,
    number,
    replace_markdown_section,
)
from bench.serving import (
    MAX_MODEL_LEN,
    MODEL_NAME,
    Server,
    free_port,
    resolve_model_dir,
    running,
    server_env,
    source_state,
    ssrl_argv,
    vllm_argv,
)
from clients.files import atomic_write_json
from router.loop import (
    GUIDED_ANSWER_FREQUENCY_PENALTY,
    GUIDED_FILL_REPETITION_PENALTY,
    INFO_PREFIX,
    INFO_SUFFIX,
    LoopConfig,
)
from router.prompts import (
    GUIDED,
    GUIDED_DOCS_PER_SEARCH,
    GUIDED_MAX_DOC_CHARS,
    answer_cue,
    example_messages,
)
from router.scoring import percentile
from router.tags import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    INFORMATION_CLOSE,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    format_documents,
    without_partial_close,
)

SECTION = "client_loop"
DEFAULT_QUESTIONS = ROOT / "tests" / "data" / "first_impression.jsonl"
DEFAULT_OUT = ROOT / "bench" / "results" / "client_loop.json"
DEFAULT_REQUESTS = {1: 8, 8: 32, 32: 32}
POLICIES = ("always", "never")
SYSTEMS = ("ssrl", "client")
TARGET_RATIO = 1.3  # ssrl / client-loop trajectories per second at c >= 8 (issue 18)

# The guided loop's caps, as the server resolves them with no request override.
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LoopConfig)}
QUERY_LOGPROBS: int = _DEFAULTS["logprobs_k"]
MAX_QUERY_TOKENS: int = _DEFAULTS["max_query_tokens"]
MAX_INFORMATION_TOKENS: int = _DEFAULTS["max_information_tokens"]
MAX_ANSWER_TOKENS: int = _DEFAULTS["max_answer_tokens"]
QUERY_STOP: tuple[str, ...] = (SEARCH_CLOSE, "\n")
FILL_STOP: tuple[str, ...] = (INFORMATION_CLOSE,)
# The answer is one line; any closing tag ends it too (as router.loop's guided answer turn).
ANSWER_STOP: tuple[str, ...] = (ANSWER_CLOSE, "\n", "</")


# --------------------------------------------------------------------------- pure pieces


@dataclass(frozen=True)
class Call:
    """One engine call of a guided trajectory, as router.loop makes it."""

    kind: str  # "query", "fill" or "answer"
    stop: tuple[str, ...]
    max_tokens: int
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0


def query_call(logprobs: int | None = QUERY_LOGPROBS) -> Call:
    return Call("query", QUERY_STOP, MAX_QUERY_TOKENS, logprobs)


def fill_call() -> Call:
    return Call("fill", FILL_STOP, MAX_INFORMATION_TOKENS, repetition_penalty=GUIDED_FILL_REPETITION_PENALTY)


def answer_call() -> Call:
    return Call("answer", ANSWER_STOP, MAX_ANSWER_TOKENS, frequency_penalty=GUIDED_ANSWER_FREQUENCY_PENALTY)


def guided_messages(question: str) -> list[dict[str, str]]:
    """The conversation ssrl builds in guided mode: system prompt, worked examples, question."""
    return [
        {"role": "system", "content": GUIDED},
        *example_messages("guided"),
        {"role": "user", "content": question},
    ]


def chat_prompt_text(tokenizer: Any, question: str) -> str:
    """The chat template applied once, as text, ending with the assistant's header."""
    text = tokenizer.apply_chat_template(
        guided_messages(question), add_generation_prompt=True, tokenize=False
    )
    return str(text)


def prompt_text(chat_prompt: str, transcript: str) -> str:
    """What each turn sends: the templated conversation plus the transcript so far, as text
    (the server re-tokenises all of it; ssrl instead extends its token ids)."""
    return chat_prompt + transcript


def search_close(query_text: str) -> str:
    """The `</search>` the loop writes after the model's query (one space before it)."""
    return SEARCH_CLOSE if query_text.endswith(" ") else " " + SEARCH_CLOSE


def completion_body(model: str, prompt: str, call: Call, temperature: float = 0.0) -> dict[str, Any]:
    """The `/v1/completions` request of one turn (vLLM's extra `repetition_penalty` included)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": call.max_tokens,
        "temperature": temperature,
        "top_p": 1.0,
        "stop": list(call.stop),
        "repetition_penalty": call.repetition_penalty,
        "frequency_penalty": call.frequency_penalty,
    }
    if call.logprobs is not None:
        body["logprobs"] = call.logprobs
    return body


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Trajectory:
    transcript: str = ""
    answer: str = ""
    query: str = ""
    route: str = ""  # external, internal, skipped
    calls: list[dict[str, Any]] = field(default_factory=list)
    search_s: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(c["prompt_tokens"] for c in self.calls)

    @property
    def completion_tokens(self) -> int:
        return sum(c["completion_tokens"] for c in self.calls)


Complete = Callable[[str, Call], Awaitable[Completion]]
Search = Callable[[str], Awaitable[str | None]]


async def run_guided(
    chat_prompt: str,
    policy: str,
    complete: Complete,
    search: Search,
    query_logprobs: int | None = QUERY_LOGPROBS,
    question: str = "",
) -> Trajectory:
    """One guided trajectory (one search, then the answer), driven from the client.

    `complete(prompt, call)` is one engine call; `search(query)` returns the formatted
    documents, or None when the search failed (the model then fills the block, as in ssrl).
    """
    t = Trajectory()

    async def turn(call: Call) -> str:
        out = await complete(prompt_text(chat_prompt, t.transcript), call)
        text = without_partial_close(out.text, call.stop)
        t.calls.append(
            {
                "kind": call.kind,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "finish_reason": out.finish_reason,
            }
        )
        t.transcript += text
        return text

    t.transcript += SEARCH_OPEN
    raw = await turn(query_call(query_logprobs))
    t.transcript += search_close(raw)
    t.query = raw.strip()
    if not t.query:
        t.route = "skipped"
    else:
        documents = None
        if policy == "always":
            started = time.perf_counter()
            documents = await search(t.query)
            t.search_s = time.perf_counter() - started
        t.transcript += INFO_PREFIX
        if documents is not None:
            t.route = "external"
            t.transcript += documents
        else:
            t.route = "internal"
            await turn(fill_call())
        t.transcript += INFO_SUFFIX
    t.transcript += ("" if t.transcript.endswith("\n") else "\n") + answer_cue(question) + ANSWER_OPEN
    t.answer = (await turn(answer_call())).strip()
    t.transcript += ANSWER_CLOSE
    return t


def load_questions(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["question"] for line in f if line.strip()]


def round_questions(questions: list[str], n: int, index: int) -> list[str]:
    """The `index`-th block of n questions, wrapping: rounds of one level ask different
    questions, so a round never replays the previous round's prompts from the prefix cache."""
    start = (index * n) % len(questions)
    return [questions[(start + i) % len(questions)] for i in range(n)]


# --------------------------------------------------------------------------- the two drivers


class ClientLoop:
    """The client-side loop against a plain vLLM OpenAI server."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, tokenizer: Any, search_service: Any) -> None:
        self.client = client
        self.url = base_url + "/v1/completions"
        self.tokenizer = tokenizer
        self.search_service = search_service
        self._templates: dict[str, str] = {}

    def chat_prompt(self, question: str) -> str:
        if question not in self._templates:
            self._templates[question] = chat_prompt_text(self.tokenizer, question)
        return self._templates[question]

    async def complete(self, prompt: str, call: Call) -> Completion:
        response = await self.client.post(self.url, json=completion_body(MODEL_NAME, prompt, call))
        response.raise_for_status()
        data = response.json()
        choice, usage = data["choices"][0], data["usage"]
        return Completion(
            choice["text"], choice.get("finish_reason"), usage["prompt_tokens"], usage["completion_tokens"]
        )

    async def search(self, query: str) -> str | None:
        outcome = await self.search_service.search(query, GUIDED_DOCS_PER_SEARCH)
        if outcome.error is not None:
            return None
        return format_documents(outcome.documents, GUIDED_MAX_DOC_CHARS)

    async def run(self, question: str, policy: str) -> dict[str, Any]:
        # The chat template is applied per trajectory (as a client would), inside the timing.
        self._templates.pop(question, None)
        t = await run_guided(
            self.chat_prompt(question), policy, self.complete, self.search, question=question
        )
        return {
            "answer": t.answer,
            "transcript": t.transcript,
            "route": t.route,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "calls": len(t.calls),
            "search_s": t.search_s,
        }


async def ssrl_trajectory(
    client: httpx.AsyncClient, base_url: str, question: str, policy: str
) -> dict[str, Any]:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "self_search": {"policy": policy},  # what the SDK's extra_body adds
    }
    response = await client.post(base_url + "/v1/chat/completions", json=body)
    response.raise_for_status()
    data = response.json()
    choice = data["choices"][0]
    searches = (choice.get("self_search") or {}).get("searches") or []
    return {
        "answer": choice["message"].get("content") or "",
        "transcript": choice["message"].get("reasoning") or "",
        "route": searches[0]["decision"] if searches else "",
        "prompt_tokens": data["usage"]["prompt_tokens"],
        "completion_tokens": data["usage"]["completion_tokens"],
        "calls": None,
        "search_s": sum(s.get("latency_s") or 0.0 for s in searches),
    }


# --------------------------------------------------------------------------- rounds


_METRIC_RE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$")
COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total")


async def scrape(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """vLLM's prompt and prefix-cache counters from /metrics (summed over labels)."""
    try:
        text = (await client.get(base_url + "/metrics", timeout=10.0)).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line.strip())
        if m and m.group(1) in COUNTERS:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


async def run_round(
    system: str,
    run_one: Callable[[str], Awaitable[dict[str, Any]]],
    questions: list[str],
    concurrency: int,
    client: httpx.AsyncClient,
    base_url: str,
    servers: dict[str, Server] | None = None,
) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int, question: str) -> dict[str, Any]:
        async with semaphore:
            started = time.perf_counter()
            try:
                r = await run_one(question)
                r["ok"] = True
            except Exception as exc:  # a failed trajectory is counted, not fatal
                r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            r["latency_s"] = time.perf_counter() - started
            r["question"] = question
            r["i"] = i
            return r

    before = await scrape(client, base_url)
    cpu_before = cpu_now(servers)
    started = time.perf_counter()
    results = await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    wall = time.perf_counter() - started
    cpu_after = cpu_now(servers)
    after = await scrape(client, base_url)
    counters = {k: after[k] - before.get(k, 0.0) for k in after}
    cpu = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 3) for k in cpu_after}
    return {
        "system": system,
        "wall_s": wall,
        "trajectories": list(results),
        "counters": counters,
        "cpu_s": cpu,
    }


def cpu_now(servers: dict[str, Server] | None) -> dict[str, float]:
    """CPU seconds (user + system) so far: each server's process tree, this process (the
    client side of both: the HTTP client, and for the client loop its template, search and
    bookkeeping), and the whole machine (busy time of every process, other users' included)."""
    import psutil

    own = psutil.Process().cpu_times()
    total = psutil.cpu_times()
    out = {
        "bench": own.user + own.system,
        "machine": sum(total) - total.idle - getattr(total, "iowait", 0.0),
    }
    for name, server in (servers or {}).items():
        out[name] = sum(server.cpu_seconds().values())
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    trajectories = [t for r in rounds for t in r["trajectories"]]
    ok = [t for t in trajectories if t["ok"]]
    wall = sum(r["wall_s"] for r in rounds)
    latencies = [t["latency_s"] for t in ok]
    engine = [t["prompt_tokens"] + t["completion_tokens"] for t in ok]
    queries = sum(r["counters"].get("vllm:prefix_cache_queries_total", 0.0) for r in rounds)
    hits = sum(r["counters"].get("vllm:prefix_cache_hits_total", 0.0) for r in rounds)
    return {
        "trajectories": len(trajectories),
        "ok": len(ok),
        "errors": sorted({t["error"] for t in trajectories if not t["ok"]})[:5],
        "wall_s": wall,
        "trajectories_per_s": len(ok) / wall if wall else None,
        "per_round_trajectories_per_s": [
            sum(1 for t in r["trajectories"] if t["ok"]) / r["wall_s"] for r in rounds if r["wall_s"]
        ],
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "engine_tokens_per_trajectory": statistics.fmean(engine) if engine else None,
        "prompt_tokens_per_trajectory": statistics.fmean(t["prompt_tokens"] for t in ok) if ok else None,
        "completion_tokens_per_trajectory": statistics.fmean(t["completion_tokens"] for t in ok)
        if ok
        else None,
        "prefilled_tokens_per_trajectory": (queries - hits) / len(ok) if ok and queries else None,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "search_s_mean": statistics.fmean(t["search_s"] for t in ok) if ok else None,
        **cpu_per_trajectory(rounds, len(ok)),
    }


def cpu_per_trajectory(rounds: list[dict[str, Any]], ok: int) -> dict[str, Any]:
    """CPU seconds per trajectory of the serving side (the round's own server tree) and of the
    client process, and the machine's busy cores beyond both (other users' load)."""
    if not ok or not all(r.get("cpu_s") for r in rounds):
        return {}
    server = sum(r["cpu_s"].get("ssrl" if r["system"] == "ssrl" else "vllm", 0.0) for r in rounds)
    idle_other = sum(r["cpu_s"].get("vllm" if r["system"] == "ssrl" else "ssrl", 0.0) for r in rounds)
    bench = sum(r["cpu_s"].get("bench", 0.0) for r in rounds)
    machine = sum(r["cpu_s"].get("machine", 0.0) for r in rounds)
    wall = sum(r["wall_s"] for r in rounds)
    return {
        "server_cpu_s_per_trajectory": server / ok,
        "client_cpu_s_per_trajectory": bench / ok,
        "cpu_s_per_trajectory": (server + bench) / ok,
        "idle_server_cpu_s": idle_other,
        "other_load_cores": max(machine - server - bench - idle_other, 0.0) / wall if wall else None,
    }


def agreement(ssrl_rounds: list[dict[str, Any]], client_rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """How often both drivers wrote the same trajectory (same question, same round)."""
    pairs = []
    for a, b in zip(ssrl_rounds, client_rounds, strict=False):
        by_q = {t["question"]: t for t in b["trajectories"] if t["ok"]}
        pairs += [(t, by_q[t["question"]]) for t in a["trajectories"] if t["ok"] and t["question"] in by_q]
    if not pairs:
        return {"pairs": 0}
    same = sum(1 for a, b in pairs if a["transcript"] == b["transcript"])
    answers = sum(1 for a, b in pairs if a["answer"] == b["answer"])
    prompt = sum(1 for a, b in pairs if a["prompt_tokens"] == b["prompt_tokens"])
    completion = sum(1 for a, b in pairs if a["completion_tokens"] == b["completion_tokens"])
    samples = [
        {"question": a["question"], "ssrl": a["transcript"], "client": b["transcript"]}
        for a, b in pairs
        if a["transcript"] != b["transcript"]
    ][:3]
    return {
        "pairs": len(pairs),
        "identical_transcripts": same / len(pairs),
        "identical_answers": answers / len(pairs),
        "identical_prompt_tokens": prompt / len(pairs),
        "identical_completion_tokens": completion / len(pairs),
        "differing_samples": samples,
    }


def bind(
    fn: Callable[[str, str], Awaitable[dict[str, Any]]], policy: str
) -> Callable[[str], Awaitable[dict[str, Any]]]:
    def run_one(question: str) -> Awaitable[dict[str, Any]]:
        return fn(question, policy)

    return run_one


async def run_benchmark(
    servers: dict[str, Server],
    tokenizer: Any,
    search_service: Any,
    questions: list[str],
    plan: dict[int, int],
    rounds: int,
    timeout: float,
) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    out = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        ssrl_url, vllm_url = servers["ssrl"].base_url, servers["vllm"].base_url
        loop = ClientLoop(client, vllm_url, tokenizer, search_service)
        runners: dict[str, tuple[Callable[[str, str], Awaitable[dict[str, Any]]], str]] = {
            "ssrl": (lambda q, p: ssrl_trajectory(client, ssrl_url, q, p), ssrl_url),
            "client": (loop.run, vllm_url),
        }
        # Warm-up (unmeasured): a few trajectories of each policy on each server.
        for policy in POLICIES:
            for system in SYSTEMS:
                fn, url = runners[system]
                warm = await run_round(system, bind(fn, policy), questions[-4:], 4, client, url)
                bad = [t["error"] for t in warm["trajectories"] if not t["ok"]]
                bad += [
                    f"not a guided trajectory: {t['transcript'][:80]!r}"
                    for t in warm["trajectories"]
                    if t["ok"] and not t["transcript"].startswith(SEARCH_OPEN)
                ]
                if bad:
                    raise RuntimeError(f"{system} warm-up failed: {bad[0]}")
        print("warm-up done", flush=True)
        block = 0
        for concurrency, n in plan.items():
            per: dict[str, dict[str, list[dict[str, Any]]]] = {p: {s: [] for s in SYSTEMS} for p in POLICIES}
            for r in range(rounds):
                for policy in POLICIES:
                    qs = round_questions(questions, n, block)
                    block += 1
                    # ssrl first in even rounds, the client loop first in odd ones.
                    order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
                    for system in order:
                        fn, url = runners[system]
                        res = await run_round(system, bind(fn, policy), qs, concurrency, client, url, servers)
                        res["round"] = r
                        res["load_1m"] = os.getloadavg()[0]
                        per[policy][system].append(res)
                        s = summarize([res])
                        print(
                            f"c={concurrency:<2} {policy:<6} round {r} {system:<6} "
                            f"{s['trajectories_per_s']:.2f} traj/s p50 {s['latency_p50_s']:.2f} s "
                            f"engine tok {s['engine_tokens_per_trajectory']:.0f} errors "
                            f"{s['trajectories'] - s['ok']} load {res['load_1m']:.1f}",
                            flush=True,
                        )
            for policy in POLICIES:
                results = {s: summarize(per[policy][s]) for s in SYSTEMS}
                a, b = results["ssrl"]["trajectories_per_s"], results["client"]["trajectories_per_s"]
                paired = [
                    x["trajectories_per_s"] / y["trajectories_per_s"]
                    for x, y in zip(
                        (summarize([rd]) for rd in per[policy]["ssrl"]),
                        (summarize([rd]) for rd in per[policy]["client"]),
                        strict=False,
                    )
                    if x["trajectories_per_s"] and y["trajectories_per_s"]
                ]
                out.append(
                    {
                        "concurrency": concurrency,
                        "policy": policy,
                        "trajectories_per_round": n,
                        "rounds": rounds,
                        "results": results,
                        "ratio": a / b if a and b else None,
                        "paired_round_ratios": paired,
                        "agreement": agreement(per[policy]["ssrl"], per[policy]["client"]),
                        "raw_rounds": {s: per[policy][s] for s in SYSTEMS},
                    }
                )
    return out


# --------------------------------------------------------------------------- loop overhead


class _Recorder:
    """An Engine proxy that records every call's prompt ids and options (for the replay)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.calls: list[tuple[list[int], Any, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, options: Any, request_id: str) -> Any:
        generated = 0
        async for delta in self._engine.generate(prompt, options, request_id):
            generated += len(delta.token_ids)
            yield delta
        self.calls.append((list(prompt), options, generated))


async def _raw(llm: Any, prompt: list[int], params: Any, request_id: str) -> tuple[int, int]:
    """One engine call straight on vLLM's AsyncLLM: (tokens generated, prompt tokens cached)."""
    from vllm.inputs import TokensPrompt

    generated = 0
    cached: int | None = None
    async for out in llm.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id):
        generated += len(out.outputs[0].token_ids)  # DELTA outputs: each holds the new tokens
        if cached is None and out.num_cached_tokens is not None:
            cached = out.num_cached_tokens
    return generated, cached or 0


def _tree_cpu() -> float:
    """CPU seconds of this process and its children (the engine core) so far."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


async def loop_overhead(engine: Any, questions: list[str], tag: str, repeats: int = 3) -> dict[str, Any]:
    """Per question: ssrl's loop (policy never), the replay of its engine calls alone (same
    prompt ids, same token counts, with and without the query's logprobs), and one single
    pass of the same total token count; plus a fixed-cost probe per call."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from router.loop import LoopFinished, SelfSearchLoop
    from router.policies import NeverPolicy
    from router.search.service import SearchService

    llm = engine.async_llm
    config = LoopConfig(mode="guided", policy=NeverPolicy(), temperature=0.0)

    def params(n: int, logprobs: int | None = None) -> Any:
        return SamplingParams(
            max_tokens=n,
            temperature=0.0,
            ignore_eos=True,
            logprobs=logprobs,
            output_kind=RequestOutputKind.DELTA,
        )

    async def one_question(i: int, question: str) -> dict[str, Any]:
        prompt = engine.apply_chat_template(guided_messages(question))
        recorder = _Recorder(engine)
        calls: list[tuple[list[int], Any, int]] = []
        tokens = 0
        cached: dict[str, list[int]] = {}
        single_cached = single_tokens = 0

        async def run_loop(rep: int) -> None:
            nonlocal calls, tokens
            recorder.calls = []
            result = None
            loop = SelfSearchLoop(recorder, SearchService([]), config, prompt, f"{tag}-loop-{i}-{rep}")
            async for event in loop.run():
                if isinstance(event, LoopFinished):
                    result = event.result
            assert result is not None
            if not calls:
                calls = list(recorder.calls)
                tokens = sum(c[2] for c in calls)

        async def replay(rep: int, logprobs: bool) -> None:
            variant = "replay" if logprobs else "replay_no_logprobs"
            hits = []
            for j, (ids, options, n) in enumerate(calls):
                lp = options.logprobs if logprobs else None
                _, hit = await _raw(llm, ids, params(max(n, 1), lp), f"{tag}-{variant}-{i}-{j}-{rep}")
                hits.append(hit)
            cached.setdefault(variant, hits)

        async def single(rep: int) -> None:
            nonlocal single_tokens, single_cached
            single_tokens, single_cached = await _raw(
                llm, list(prompt), params(tokens), f"{tag}-single-{i}-{rep}"
            )

        # Fixed cost of one engine call: one token from a prompt whose every full block is
        # cached (the shared system prompt and examples: 4 x 128 tokens).
        probe_ids = list(prompt)[:512]

        async def probe(rep: int) -> None:
            await _raw(llm, probe_ids, params(1), f"{tag}-probe-{i}-{rep}")

        # Each variant `repeats` times, interleaved; the least wall (and CPU) time of each is
        # kept: the machine is shared, and the minimum is what the work itself costs.
        wall: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for rep in range(repeats):
            variants: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("loop", lambda rep=rep: run_loop(rep)),  # type: ignore[misc]
                ("replay", lambda rep=rep: replay(rep, True)),  # type: ignore[misc]
                ("replay_no_logprobs", lambda rep=rep: replay(rep, False)),  # type: ignore[misc]
                ("single", lambda rep=rep: single(rep)),  # type: ignore[misc]
                ("probe", lambda rep=rep: probe(rep)),  # type: ignore[misc]
            ]
            for name, fn in variants:
                c0, t0 = _tree_cpu(), time.perf_counter()
                await fn()
                wall.setdefault(name, []).append(time.perf_counter() - t0)
                cpu.setdefault(name, []).append(_tree_cpu() - c0)
        return {
            "question": question,
            "calls": len(calls),
            "tokens": tokens,
            "single_tokens": single_tokens,
            **{f"{k}_s": min(v) for k, v in wall.items()},
            **{f"{k}_cpu_s": min(v) for k, v in cpu.items()},
            "wall_samples": wall,
            "prompt_tokens_per_call": [len(c[0]) for c in calls],
            "cached_tokens_per_call": cached["replay"],
            "single_prompt_tokens": len(prompt),
            "single_cached_tokens": single_cached,
        }

    rows = [await one_question(i, q) for i, q in enumerate(questions)]
    return {"rows": rows}


def overhead_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total = {k: sum(r[k] for r in rows) for k in ("loop_s", "replay_s", "replay_no_logprobs_s", "single_s")}
    cpu = {
        k: sum(r.get(f"{k}_cpu_s", 0.0) for r in rows)
        for k in ("loop", "replay", "replay_no_logprobs", "single")
    }
    tokens = sum(r["tokens"] for r in rows)
    calls = sum(r["calls"] for r in rows)
    single = total["single_s"]
    # One decode step, from the single pass: what a 1-token probe would have cost anyway.
    step = single / tokens if tokens else 0.0
    fixed_per_call = statistics.fmean(max(r["probe_s"] - step, 0.0) for r in rows)
    extra_calls = calls - len(rows)
    prefilled_loop = sum(sum(r["prompt_tokens_per_call"]) - sum(r["cached_tokens_per_call"]) for r in rows)
    prefilled_single = sum(r["single_prompt_tokens"] - r["single_cached_tokens"] for r in rows)
    fixed = fixed_per_call * extra_calls
    parts = {
        "loop_python_s": total["loop_s"] - total["replay_s"],
        "query_logprobs_s": total["replay_s"] - total["replay_no_logprobs_s"],
        "extra_call_fixed_s": fixed,
        "extra_prefill_and_rest_s": total["replay_no_logprobs_s"] - single - fixed,
    }
    return {
        "questions": len(rows),
        "tokens": tokens,
        "calls": calls,
        **total,
        "cpu_s": cpu,
        "cpu_ratio": cpu["loop"] / cpu["single"] if cpu["single"] else None,
        "ratio": total["loop_s"] / single if single else None,
        "replay_ratio": total["replay_s"] / single if single else None,
        "replay_no_logprobs_ratio": total["replay_no_logprobs_s"] / single if single else None,
        "decode_step_s": step,
        "fixed_cost_per_call_s": fixed_per_call,
        "prefilled_tokens_loop": prefilled_loop,
        "prefilled_tokens_single": prefilled_single,
        "parts": parts,
        "parts_share_of_overhead": {
            k: v / (total["loop_s"] - single) if total["loop_s"] > single else None for k, v in parts.items()
        },
    }


async def overhead_async(model_dir: str, questions: list[str], repeats: int = 3) -> dict[str, Any]:
    from router.engine.vllm_engine import EngineConfig, VLLMEngine

    engine = VLLMEngine.start(
        EngineConfig(
            model=model_dir,
            served_model_name=MODEL_NAME,
            max_model_len=MAX_MODEL_LEN,
            enforce_eager=True,
            enable_prefix_caching=True,
        )
    )
    try:
        await loop_overhead(engine, questions[-1:], "warm", 1)
        rows = (await loop_overhead(engine, questions, "measure", repeats))["rows"]
    finally:
        await engine.shutdown()
    return {"summary": overhead_summary(rows), "rows": rows, "repeats": repeats}


# --------------------------------------------------------------------------- report


def token_gap(level: dict[str, Any]) -> list[int]:
    """ssrl minus client prompt tokens, per trajectory both wrote alike (same question and
    round, identical transcripts): the difference the token sequences alone make."""
    raw = level.get("raw_rounds") or {}
    gaps = []
    for a, b in zip(raw.get("ssrl", []), raw.get("client", []), strict=False):
        by_q = {t["question"]: t for t in b["trajectories"] if t["ok"]}
        gaps += [
            t["prompt_tokens"] - by_q[t["question"]]["prompt_tokens"]
            for t in a["trajectories"]
            if t["ok"] and t["question"] in by_q and t["transcript"] == by_q[t["question"]]["transcript"]
        ]
    return gaps


def token_gap_text(report: dict[str, Any]) -> str:
    parts = []
    for policy in POLICIES:
        gaps = [g for lv in report["levels"] if lv["policy"] == policy for g in token_gap(lv)]
        if gaps:
            counts = {g: gaps.count(g) for g in sorted(set(gaps))}
            parts.append(
                f"policy {policy}, {len(gaps)} pairs with identical transcripts: "
                + ", ".join(f"{g:+d} in {n}" for g, n in counts.items())
            )
    return "; ".join(parts) or "–"


def _sharing(report: dict[str, Any]) -> str:
    """Whether other work shared the machine, from the rounds' measured other load."""
    others = [
        side.get("other_load_cores") or 0.0
        for level in report.get("levels", [])
        for side in level.get("results", {}).values()
    ]
    peak = max(others, default=0.0)
    if peak > 0.3:
        return f"Other processes took up to {peak:.1f} cores during the rounds: figures are noisy."
    return f"Other processes took at most {peak:.2f} cores during the rounds (a quiet machine)."


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "## Client-side loop baseline: ssrl's server-side loop vs a client driving plain vLLM",
        "",
        "What agent builders do today (Search-R1's inference script, most agent frameworks): a "
        "client generates up to `</search>`, calls search, appends the documents to the text and "
        "re-sends. `bench/client_loop.py` drives vLLM's own OpenAI server "
        "(`python -m vllm.entrypoints.openai.api_server`) through the same guided trajectory as "
        "ssrl's loop and compares it with ssrl serving the same checkpoint (issue 18).",
        "",
        "### Machine",
        "",
        machine_markdown(report["machine"]).rstrip(),
        f"- {load_line(report)} {_sharing(report)}",
        "",
        "### Command",
        "",
        f"`{report['command']}`",
        "",
        "Servers (both up for the whole run, on the converted embedded checkpoint, "
        f"`VLLM_CPU_KVCACHE_SPACE={cfg['kvcache_gib']}`):",
        "",
        *[
            f"- {name}: `{' '.join(shlex.quote(a) for a in argv)}`"
            for name, argv in cfg["server_argv"].items()
        ],
        "",
        "### Method",
        "",
        "- Same trajectory on both sides: the guided system prompt and worked examples of "
        "`router/prompts.py`, one search then the answer, the stop strings, caps and penalties of "
        "`router/loop.py` (query: stop `</search>`/newline, 48 tokens, top-20 logprobs; "
        "information fill: stop `</information>`, 128 tokens, repetition penalty 1.1; answer: stop "
        "`</answer>`/newline/`</`, 32 tokens, frequency penalty 2.0), temperature 0, non-streaming.",
        "- ssrl: `POST /v1/chat/completions` with `self_search: {policy}` (what the SDK's "
        "`extra_body` sends); the loop runs in the server on token ids.",
        "- Client loop: the client applies the chat template once, as text (the tokenizer's "
        "`apply_chat_template(..., add_generation_prompt=True, tokenize=False)`), and sends each "
        "turn to `/v1/completions` as one text prompt (the templated conversation plus the "
        "transcript so far), which vLLM re-tokenises per turn. Policy `always`: the client calls "
        "the same search service ssrl builds (the local BM25 index, 1 document of 300 "
        "characters, the guided defaults, same cache) and appends "
        "`\\n\\n<information>Doc 1(Title: ...) ...</information>\\n\\n<answer>`; policy `never`: "
        "a third call lets the model fill the block.",
        "- Token sequence: the chat endpoint with `continue_final_message` renders the same text "
        "as this completions prompt, so both re-tokenise alike. The text route gives ssrl's ids "
        "except where a stop string cut one of the model's tokens: the model writes ` </` (space "
        "and bracket in one token) before `</search>` or `</information>`; ssrl keeps the part "
        "before the cut as a lone `Ġ` and encodes the tag alone (`Ġ`, `</`, `search`, `>`), where "
        "re-tokenising the text gives back the model's own `Ġ</`, `search`, `>`. So the client's "
        "prompts are one token shorter per such cut and per later call "
        f"(measured, ssrl − client prompt tokens per paired trajectory: {token_gap_text(report)}). "
        "Sending token ids (`/v1/completions` takes them, `return_token_ids` returns the model's) "
        "would copy ssrl's ids exactly but is not what clients do; it was not run.",
        f"- Questions: `tests/data/first_impression.jsonl`; per round {cfg['requests_per_round']} "
        f"trajectories (c: n), {cfg['rounds']} rounds per policy and system; each round takes a new "
        "block of questions, run by both systems back to back, the first of the two alternating "
        "per round.",
        "- Engine tokens: prompt + completion tokens summed over every engine call of a trajectory "
        "(ssrl: the response's `usage`; client: the sum of the per-call `usage`). Prefilled: "
        "prompt tokens the engine computed, i.e. not served from the prefix cache (each server's "
        "`vllm:prefix_cache_queries_total - vllm:prefix_cache_hits_total` over the rounds).",
        "",
        "### Results",
        "",
        "| c | policy | ssrl traj/s | client traj/s | ratio (paired rounds) | ssrl p50 / p99 | client p50 / p99 "
        "| engine tokens ssrl / client | prefilled ssrl / client | calls |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    missed = []
    for level in report["levels"]:
        s, c = level["results"]["ssrl"], level["results"]["client"]
        r = level["ratio"]
        target = level["concurrency"] >= 8
        mark = ""
        if target and r is not None:
            mark = " ✓" if r >= TARGET_RATIO else " ✗"
            if r < TARGET_RATIO:
                missed.append(f"c={level['concurrency']} {level['policy']} ({r:.2f})")
        paired = ", ".join(number(x) for x in level["paired_round_ratios"])
        calls = "2" if level["policy"] == "always" else "3"
        lines.append(
            f"| {level['concurrency']} | {level['policy']} | {number(s['trajectories_per_s'])} "
            f"| {number(c['trajectories_per_s'])} | **{number(r)}**{mark} ({paired}) "
            f"| {number(s['latency_p50_s'])} / {number(s['latency_p99_s'])} s "
            f"| {number(c['latency_p50_s'])} / {number(c['latency_p99_s'])} s "
            f"| {number(s['engine_tokens_per_trajectory'], 0)} / {number(c['engine_tokens_per_trajectory'], 0)} "
            f"| {number(s['prefilled_tokens_per_trajectory'], 0)} / {number(c['prefilled_tokens_per_trajectory'], 0)} "
            f"| {calls} |"
        )
    errors = sum(
        level["results"][s]["trajectories"] - level["results"][s]["ok"]
        for level in report["levels"]
        for s in SYSTEMS
    )
    if all("cpu_s_per_trajectory" in lv["results"][sys_] for lv in report["levels"] for sys_ in SYSTEMS):
        lines += [
            "",
            "CPU time per trajectory (less sensitive to the shared machine than wall time): the "
            "serving side's process tree (ssrl; vLLM's API server and engine) plus the benchmark "
            "process (the HTTP client, and for the client loop its template, search calls and "
            "bookkeeping); the last column is the rest of the machine's busy time during the "
            "rounds, in cores (other users' load, the idle server's own polling included).",
            "",
            "| c | policy | ssrl: server + client CPU s | client loop: vLLM + client CPU s "
            "| CPU ratio client/ssrl | other load (cores) |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for level in report["levels"]:
            s, c = level["results"]["ssrl"], level["results"]["client"]
            other = [x for x in (s.get("other_load_cores"), c.get("other_load_cores")) if x is not None]
            lines.append(
                f"| {level['concurrency']} | {level['policy']} "
                f"| {number(s['server_cpu_s_per_trajectory'], 3)} + {number(s['client_cpu_s_per_trajectory'], 3)} "
                f"| {number(c['server_cpu_s_per_trajectory'], 3)} + {number(c['client_cpu_s_per_trajectory'], 3)} "
                f"| {number(c['cpu_s_per_trajectory'] / s['cpu_s_per_trajectory'] if s['cpu_s_per_trajectory'] else None)} "
                f"| {number(statistics.fmean(other) if other else None, 1)} |"
            )
    lines += [
        "",
        f"Target (issue 18): ssrl ≥ {TARGET_RATIO}× the client loop's trajectories/s at c = 8 and 32. "
        + ("**Met.**" if not missed else "**Missed:** " + "; ".join(missed) + ".")
        + f" Failed trajectories: {errors}.",
        "",
        "Agreement (same question, same round): "
        + "; ".join(
            f"c={lv['concurrency']} {lv['policy']}: transcripts "
            f"{number(100 * lv['agreement'].get('identical_transcripts', 0), 0)}%, engine prompt tokens "
            f"{number(100 * lv['agreement'].get('identical_prompt_tokens', 0), 0)}%"
            for lv in report["levels"]
        )
        + ".",
        "",
    ]
    explanation = report.get("explanation")
    if explanation:
        lines += ["### Why", "", explanation.strip(), ""]
    ov = report.get("overhead")
    if ov:
        s = ov["summary"]
        p = s["parts"]
        share = s["parts_share_of_overhead"]
        lines += [
            "### Loop overhead: a model-filled trajectory vs one single pass",
            "",
            f"In process (no HTTP), `--enforce-eager`, prefix caching on, after the servers stopped: "
            f"{s['questions']} questions, per question ssrl's loop with policy `never` (3 engine calls), "
            "then a replay of the same 3 calls straight on vLLM's `AsyncLLM` (same prompt ids, same "
            "token counts via `ignore_eos`; with and without the query's top-20 logprobs), then one "
            "single pass of the same total token count from the same prompt (bench/loop.py's "
            "measure), and a 1-token call on a fully cached 512-token prompt (an engine call's "
            "fixed cost). Each of the five runs "
            f"{ov.get('repeats', 1)} times per question, interleaved; the least wall and CPU time "
            "of each is kept (the machine is shared)."
            + (f" Command: `{ov['command']}`." if ov.get("command") else "")
            + (
                f" Load (1-minute average) at start / end: {ov['load_avg_1m']['start']:.1f} / "
                f"{ov['load_avg_1m']['end']:.1f}."
                if ov.get("load_avg_1m")
                else ""
            ),
            "",
            "| | wall (s) | × single pass | CPU s (process + engine) | × single pass |",
            "|---|---:|---:|---:|---:|",
            *[
                f"| {label} | {s[key + '_s']:.2f} | {number(s[key + '_s'] / s['single_s'], 3)} "
                f"| {number(s.get('cpu_s', {}).get(key))} "
                f"| {number(s['cpu_s'][key] / s['cpu_s']['single'] if s.get('cpu_s', {}).get('single') else None, 3)} |"
                for label, key in (
                    ("ssrl loop, policy never", "loop"),
                    ("replay of its engine calls", "replay"),
                    ("replay without logprobs", "replay_no_logprobs"),
                    (f"single pass ({s['tokens']} tokens)", "single"),
                )
            ],
            "",
            "| where the overhead goes | s | share |",
            "|---|---:|---:|",
            f"| loop's own Python (tokenising inserted tags, id bookkeeping, hold-back, entropy) "
            f"| {p['loop_python_s']:.2f} | {number(100 * (share['loop_python_s'] or 0), 0)}% |",
            f"| top-20 logprobs on the query | {p['query_logprobs_s']:.2f} "
            f"| {number(100 * (share['query_logprobs_s'] or 0), 0)}% |",
            f"| fixed cost of the {s['calls'] - s['questions']} extra engine calls "
            f"({1000 * s['fixed_cost_per_call_s']:.0f} ms each) | {p['extra_call_fixed_s']:.2f} "
            f"| {number(100 * (share['extra_call_fixed_s'] or 0), 0)}% |",
            f"| extra prefill and the rest ({s['prefilled_tokens_loop']} prompt tokens computed vs "
            f"{s['prefilled_tokens_single']} for the single passes) | {p['extra_prefill_and_rest_s']:.2f} "
            f"| {number(100 * (share['extra_prefill_and_rest_s'] or 0), 0)}% |",
            "",
        ]
        note = report.get("overhead_explanation")
        if note:
            lines += [note.strip(), ""]
    timing = report["timing"]
    rerun = bool(ov and ov.get("command"))
    lines += [
        f"Run time of the command: {timing['total_s'] / 60:.1f} min (start-up ssrl "
        f"{number(timing['startup_s'].get('ssrl'), 0)} s, vLLM {number(timing['startup_s'].get('vllm'), 0)} s; "
        f"rounds {timing['load_s'] / 60:.1f} min"
        + (
            f"; the overhead part, re-run alone, {timing['overhead_s'] / 60:.1f} min"
            if rerun and timing.get("overhead_s")
            else (f"; overhead part {timing['overhead_s'] / 60:.1f} min" if timing.get("overhead_s") else "")
        )
        + "). Raw figures: `bench/results/client_loop.json`.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.client_loop",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    p.add_argument(
        "--requests-per-level",
        default=None,
        help="trajectories per round: one number, or one per level (default 8 at c=1, 32 at c=8 and 32)",
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds per policy and system per level")
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    p.add_argument("--overhead-questions", type=int, default=8, help="in-process overhead part (0: skip)")
    p.add_argument("--overhead-repeats", type=int, default=3, help="runs of each variant; the least is kept")
    p.add_argument(
        "--overhead-only",
        action="store_true",
        help="run only the in-process overhead part and put it into the existing --out results",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD, help="'' to skip")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--render-from", type=Path, default=None, metavar="JSON", help="only rewrite the section")
    p.add_argument("--explanation-file", type=Path, default=None, help="Markdown for the 'Why' part")
    return p


def plan_of(levels_text: str, spec: str | None) -> dict[int, int]:
    levels = [int(x) for x in levels_text.split(",") if x.strip()]
    if spec is None:
        return {c: DEFAULT_REQUESTS.get(c, 2 * c) for c in levels}
    values = [int(x) for x in spec.split(",") if x.strip()]
    if len(values) == 1:
        values *= len(levels)
    if len(values) != len(levels):
        raise SystemExit("--requests-per-level: one number, or one per level")
    return dict(zip(levels, values, strict=True))


def overhead_only(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-measure the overhead part alone into an existing results file (keeps the rest)."""
    report = json.loads(args.out.read_text(encoding="utf-8"))
    model_dir = resolve_model_dir(args.model_dir)
    questions = load_questions(args.questions)
    t0 = time.monotonic()
    load = os.getloadavg()[0]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", server_env()["VLLM_CPU_KVCACHE_SPACE"])
    report["overhead"] = asyncio.run(
        overhead_async(model_dir, questions[: args.overhead_questions], args.overhead_repeats)
    )
    report["overhead"]["command"] = " ".join(
        [".venv/bin/python", "-m", "bench.client_loop", *map(shlex.quote, argv)]
    )
    report["overhead"]["load_avg_1m"] = {"start": load, "end": os.getloadavg()[0]}
    report["timing"]["overhead_s"] = time.monotonic() - t0
    _explanations(report, args.explanation_file)
    atomic_write_json(args.out, report)
    if str(args.markdown) not in ("", "."):
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
    print(json.dumps(report["overhead"]["summary"], indent=1))
    return 0


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _explanations(report: dict[str, Any], path: Path | None) -> None:
    if path is None or not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    why, _, overhead = text.partition("<!-- overhead -->")
    report["explanation"] = why.strip()
    if overhead.strip():
        report["overhead_explanation"] = overhead.strip()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.render_from is not None:
        report = json.loads(args.render_from.read_text(encoding="utf-8"))
        _explanations(report, args.explanation_file)
        if args.explanation_file is not None:
            atomic_write_json(args.render_from, report)
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
        print(f"wrote the {SECTION} section of {args.markdown}")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    if args.overhead_only:
        return overhead_only(args, argv)
    t_start = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()[0]
    plan = plan_of(args.concurrency, args.requests_per_level)
    questions = load_questions(args.questions)
    model_dir = resolve_model_dir(args.model_dir)

    from transformers import AutoTokenizer

    from server.search_config import build_search_service
    from server.settings import ServeSettings

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    search_service = build_search_service(ServeSettings())
    env = server_env()
    log_dir = Path(tempfile.mkdtemp(prefix="ssrl-bench-client-loop-"))
    ports = {"ssrl": free_port(), "vllm": free_port()}
    ssrl = ssrl_argv(args.python, model_dir, ports["ssrl"], True)
    # The loop is the workload here, in guided mode (auto picks native for a checkpoint path).
    ssrl = [a for a in ssrl if a != "--no-self-search"] + ["--search-mode", "guided"]
    servers = {
        "ssrl": Server("ssrl", ssrl, ports["ssrl"], log_dir / "ssrl.log", env),
        "vllm": Server(
            "vllm",
            vllm_argv(args.python, model_dir, ports["vllm"], True),
            ports["vllm"],
            log_dir / "vllm.log",
            env,
        ),
    }
    command = " ".join([".venv/bin/python", "-m", "bench.client_loop", *map(shlex.quote, argv)])
    print(f"model: {model_dir}\nlogs: {log_dir}\nplan: {plan} x {args.rounds} rounds", flush=True)
    with running(servers.values(), args.startup_timeout):
        t_load = time.monotonic()
        levels = asyncio.run(
            run_benchmark(
                servers, tokenizer, search_service, questions, plan, args.rounds, args.request_timeout
            )
        )
        load_s = time.monotonic() - t_load
    load_end = os.getloadavg()[0]
    overhead = None
    overhead_s = None
    if args.overhead_questions > 0:
        t0 = time.monotonic()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", env["VLLM_CPU_KVCACHE_SPACE"])
        overhead = asyncio.run(
            overhead_async(model_dir, questions[: args.overhead_questions], args.overhead_repeats)
        )
        overhead_s = time.monotonic() - t0
        print(json.dumps(overhead["summary"], indent=1), flush=True)
    report = {
        "benchmark": "client_loop: ssrl server-side loop vs client-side loop over vLLM's OpenAI server",
        "started_at": started_at,
        "command": command,
        "machine": machine_info(),
        "load_avg_1m": {"start": load_start, "end": load_end},
        "source": source_state(),
        "config": {
            "model_dir": model_dir,
            "max_model_len": MAX_MODEL_LEN,
            "enforce_eager": True,
            "kvcache_gib": int(env["VLLM_CPU_KVCACHE_SPACE"]),
            "requests_per_round": ", ".join(f"{c}: {n}" for c, n in plan.items()),
            "rounds": args.rounds,
            "questions_file": str(
                args.questions.relative_to(ROOT) if args.questions.is_relative_to(ROOT) else args.questions
            ),
            "client_prompt": "/v1/completions, text prompt (chat template applied once by the client)",
            "query_logprobs": QUERY_LOGPROBS,
            "docs_per_search": GUIDED_DOCS_PER_SEARCH,
            "max_doc_chars": GUIDED_MAX_DOC_CHARS,
            "server_argv": {s.name: s.argv for s in servers.values()},
        },
        "levels": levels,
        "overhead": overhead,
        "timing": {
            "total_s": time.monotonic() - t_start,
            "load_s": load_s,
            "overhead_s": overhead_s,
            "startup_s": {s.name: s.startup_s for s in servers.values()},
        },
        "logs": str(log_dir),
    }
    _explanations(report, args.explanation_file)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    if str(args.markdown) not in ("", "."):
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
        print(f"wrote the {SECTION} section of {args.markdown}")
    for level in levels:
        s, c = level["results"]["ssrl"], level["results"]["client"]
        print(
            f"c={level['concurrency']:<2} {level['policy']:<6} ssrl {number(s['trajectories_per_s'])} "
            f"client {number(c['trajectories_per_s'])} ratio {number(level['ratio'])} "
            f"agree {number(level['agreement'].get('identical_transcripts'))}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
