"""Serving benchmark: ssrl against vLLM's own OpenAI server, same model, same engine options.

Both servers are started on free loopback ports (one after the other, each waited for and
warmed up), then run side by side while the load generator interleaves rounds:
ssrl, vLLM, ssrl, vLLM, ... at each concurrency level. Every request is a streaming chat
completion (temperature 0, fixed max_tokens, usage requested), so that time to first
token and total latency are measured per request and output tokens come from `usage`.
A background thread samples the RSS of each server's whole process tree every 0.5 s.

    .venv/bin/python -m bench.serving --enforce-eager
    .venv/bin/python -m bench.serving --concurrency 1,8 --rounds 1 --requests-per-level 4,8

Writes bench/results/serving.json and the "Serving" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    BENCHMARKS_MD,
    ROOT,
    machine_info,
    machine_markdown,
    number,
    replace_markdown_section,
)
from clients.files import atomic_write_json
from router.scoring import percentile

SECTION = "serving"
MODEL_NAME = "bench"
DEFAULT_QUESTIONS = Path("/work/shared/data/qa/nq_open_dev.jsonl")
DEFAULT_OUT = ROOT / "bench" / "results" / "serving.json"
DEFAULT_REQUESTS = {1: 16, 8: 32, 32: 64}
KVCACHE_GIB = "2"
MAX_MODEL_LEN = 2048
PROMPT_TEMPLATE = "{question}? Answer in a few sentences."

TARGETS = {
    "throughput_ratio_min": 0.95,
    "p50_latency_ratio_max": 1.05,
    "memory_ratio_max": 1.10,
}

SERVERS = ("ssrl", "vllm")


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(match_ssrl_engine: bool = True) -> dict[str, str]:
    """The environment of a server: ours, minus SSRL_* settings, plus the KV cache size; with
    `match_ssrl_engine`, what ssrl's in-process engine sets for itself on this CPU (see
    `router.engine.vllm_engine.cpu_engine_env`), so that vLLM's own server runs the same engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSRL_")}
    env["VLLM_CPU_KVCACHE_SPACE"] = KVCACHE_GIB
    env.setdefault("PYTHONUNBUFFERED", "1")
    if match_ssrl_engine:
        from router.engine.vllm_engine import cpu_engine_env, usable_cores, vllm_on_cpu

        if vllm_on_cpu():
            env.update(cpu_engine_env(env, usable_cores()))
    return env


def ssrl_plain_flags() -> list[str]:
    """Flags that make ssrl serve plain chat, as vLLM does: its self-search loop (on by default
    for chat once it exists) is another workload, benchmarked on its own."""
    try:
        from server.settings import ServeSettings
    except Exception:
        return []
    return ["--no-self-search"] if "self_search" in ServeSettings.model_fields else []


def ssrl_argv(
    python: str, model_dir: str, port: int, enforce_eager: bool, extra: list[str] | None = None
) -> list[str]:
    argv = [
        python,
        "-m",
        "clients.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model_dir,
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enable-prefix-caching",
        *ssrl_plain_flags(),
    ]
    if enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(extra or [])


def vllm_argv(
    python: str, model_dir: str, port: int, enforce_eager: bool, match_ssrl_engine: bool = True
) -> list[str]:
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model_dir,
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enable-prefix-caching",
    ]
    if enforce_eager:
        argv.append("--enforce-eager")
    from router.engine.vllm_engine import CPU_BLOCK_SIZE, vllm_on_cpu

    if match_ssrl_engine and vllm_on_cpu():
        # ssrl's in-process engine uses this KV block size on the CPU backend: same engine options.
        argv += ["--block-size", str(CPU_BLOCK_SIZE)]
    return argv


def _block_size(cfg: dict[str, Any]) -> str | None:
    """The KV block size both servers ran with, where the vLLM argv set it (ssrl's CPU default)."""
    argv = cfg["server_argv"].get("vllm", [])
    return argv[argv.index("--block-size") + 1] if "--block-size" in argv else None


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    startup_s: float | None = None
    warmup_s: float | None = None
    _log: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> None:
        """Poll GET /health (at most once a second, `timeout` seconds in all) until it is 200."""
        assert self.proc is not None
        started = time.monotonic()
        deadline = started + timeout
        attempts = int(timeout) + 1
        with httpx.Client(timeout=5.0) as client:
            for _ in range(attempts):
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode} while starting; "
                        f"log: {self.log_path}\n{tail(self.log_path)}"
                    )
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        self.startup_s = time.monotonic() - started
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= deadline:
                    break
                time.sleep(1.0)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f} s; log: {self.log_path}")

    def tree(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user+system) of the front-end process and of its children, now."""
        front = children = 0.0
        for i, proc in enumerate(self.tree()):
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            if i == 0:
                front += t.user + t.system
            else:
                children += t.user + t.system
        return {"frontend": front, "children": children}

    def stop(self) -> None:
        """SIGTERM the whole process group, wait up to 30 s, then SIGKILL what is left."""
        if self.proc is None:
            return
        leftovers = self.tree()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        # Children that left the group (none expected) are ended one by one, by pid.
        for proc in leftovers:
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.Error:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None


@contextmanager
def running(servers: Iterable[Server], startup_timeout: float) -> Iterator[None]:
    """Start the servers one after the other, each waited for (2 cores do not start two at
    once well); on any error, here or in the body, print each server's log tail; always stop
    them, the last started first."""
    started = list(servers)
    try:
        for server in started:
            print(f"starting {server.name}: {shlex.join(server.argv)}", flush=True)
            server.start()
            server.wait_ready(startup_timeout)
            print(f"  {server.name} healthy after {server.startup_s:.0f} s", flush=True)
        yield
    except BaseException:
        for server in started:
            print(f"--- {server.name} log tail\n{tail(server.log_path)}", file=sys.stderr)
        raise
    finally:
        for server in reversed(started):
            server.stop()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class MemorySampler(threading.Thread):
    """Peak RSS (summed over each server's process tree), every `interval` s, bounded in time."""

    def __init__(self, servers: list[Server], interval: float = 0.5, max_seconds: float = 7200):
        super().__init__(name="memory-sampler", daemon=True)
        self.servers = servers
        self.interval = interval
        self.max_seconds = max_seconds
        self.stop_event = threading.Event()
        self.peak_rss: dict[str, int] = {s.name: 0 for s in servers}
        self.peak_processes: dict[str, int] = {s.name: 0 for s in servers}
        self.last_rss: dict[str, int] = {s.name: 0 for s in servers}
        self.samples = 0
        self.lock = threading.Lock()

    def sample_once(self) -> None:
        for server in self.servers:
            total = 0
            procs = server.tree()
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            with self.lock:
                self.last_rss[server.name] = total
                if total > self.peak_rss[server.name]:
                    self.peak_rss[server.name] = total
                    self.peak_processes[server.name] = len(procs)
        self.samples += 1

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(int(self.max_seconds / self.interval) + 1):
            if self.stop_event.is_set() or time.monotonic() > deadline:
                return
            self.sample_once()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


# --------------------------------------------------------------------------- load


def load_prompts(path: Path, n: int) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(prompts) >= n:
                break
            if line.strip():
                question = json.loads(line)["question"].strip().rstrip("?")
                prompts.append(PROMPT_TEMPLATE.format(question=question[:1].upper() + question[1:]))
    if not prompts:
        raise SystemExit(f"no questions in {path}")
    return prompts


def request_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streaming chat completion: latency, TTFT (first non-empty content delta), usage."""
    result: dict[str, Any] = {
        "ok": False,
        "latency": None,
        "ttft": None,
        "completion_tokens": None,
        "prompt_tokens": None,
        "chunks": 0,
        "text": "",
        "error": None,
    }
    parts: list[str] = []
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raw = await response.aread()
                result["error"] = f"HTTP {response.status_code}: {raw[:200]!r}"
                return result
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result["error"] = f"stream error: {str(payload['error'])[:200]}"
                    return result
                result["chunks"] += 1
                for choice in payload.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if result["ttft"] is None:
                            result["ttft"] = time.perf_counter() - start
                        parts.append(content)
                usage = payload.get("usage")
                if usage:
                    result["completion_tokens"] = usage.get("completion_tokens")
                    result["prompt_tokens"] = usage.get("prompt_tokens")
            result["latency"] = time.perf_counter() - start
            result["text"] = "".join(parts)
            if not done:
                result["error"] = "stream ended without [DONE]"
            elif result["completion_tokens"] is None:
                result["error"] = "no usage in the stream"
            else:
                result["ok"] = True
    except (httpx.HTTPError, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return result


async def run_round(
    base_url: str,
    prompts: list[str],
    n: int,
    concurrency: int,
    max_tokens: int,
    request_timeout: float,
    round_timeout: float,
) -> dict[str, Any]:
    """n requests (prompts[i % len]) kept `concurrency` in flight; a fresh client per round."""
    url = base_url + "/v1/chat/completions"
    results: list[dict[str, Any] | None] = [None] * n
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(request_timeout, connect=10.0, pool=request_timeout)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < n:  # bounded: each pass takes one of n indices
                i = next_index
                next_index += 1
                results[i] = await stream_one(
                    client, url, request_body(prompts[i % len(prompts)], max_tokens)
                )

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, n))]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=round_timeout)
        except TimeoutError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - start

    done = [
        r
        if r is not None
        else {
            "ok": False,
            "error": "round timed out",
            "latency": None,
            "ttft": None,
            "completion_tokens": None,
            "text": "",
        }
        for r in results
    ]
    return {"wall_s": wall, "requests": done}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the rounds of one server at one level."""
    requests = [r for rd in rounds for r in rd["requests"]]
    ok = [r for r in requests if r["ok"]]
    wall = sum(rd["wall_s"] for rd in rounds)
    tokens = sum(r["completion_tokens"] for r in ok)
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    per_round = []
    for rd in rounds:
        rd_ok = [r for r in rd["requests"] if r["ok"]]
        rd_tokens = sum(r["completion_tokens"] for r in rd_ok)
        per_round.append(
            {
                "wall_s": round(rd["wall_s"], 3),
                "requests_per_s": round(len(rd_ok) / rd["wall_s"], 3) if rd["wall_s"] else None,
                "output_tokens_per_s": round(rd_tokens / rd["wall_s"], 2) if rd["wall_s"] else None,
                "errors": len(rd["requests"]) - len(rd_ok),
                "cpu_s": rd.get("cpu_s"),
                "client_cpu_s": round(rd.get("client_cpu_s", 0.0), 3),
                "background_cpu_s": round(rd.get("background_cpu_s", 0.0), 3),
                "background_cores": round(rd.get("background_cpu_s", 0.0) / rd["wall_s"], 3)
                if rd["wall_s"]
                else None,
            }
        )
    errors = [r["error"] for r in requests if not r["ok"]]
    cpu_front = sum((rd.get("cpu_s") or {}).get("frontend", 0.0) for rd in rounds)
    cpu_children = sum((rd.get("cpu_s") or {}).get("children", 0.0) for rd in rounds)
    other_cpu = sum(rd.get("other_server_cpu_s", 0.0) for rd in rounds)
    return {
        "requests": len(requests),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "wall_s": round(wall, 3),
        "requests_per_s": len(ok) / wall if wall else None,
        "output_tokens_per_s": tokens / wall if wall else None,
        "completion_tokens": tokens,
        "mean_completion_tokens": tokens / len(ok) if ok else None,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "frontend_cpu_s_per_request": cpu_front / len(ok) if ok else None,
        "engine_cpu_s_per_request": cpu_children / len(ok) if ok else None,
        "idle_other_server_cpu_s": round(other_cpu, 3),
        "background_cores_mean": (
            sum(rd.get("background_cpu_s", 0.0) for rd in rounds) / wall if wall else None
        ),
        "rounds": per_round,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def mark(ok: bool | None) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


# --------------------------------------------------------------------------- the run


@dataclass
class Plan:
    levels: list[int]
    requests: dict[int, int]
    rounds: int
    max_tokens: int
    warmup_per_level: bool
    request_timeout: float
    max_duration: float
    servers: list[Server] = field(default_factory=list)


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in before}


def machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine (all processes), now."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def own_cpu_seconds() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


async def run_levels(plan: Plan, prompts: list[str], deadline: float) -> list[dict[str, Any]]:
    by_name = {s.name: s for s in plan.servers}
    levels_out = []
    for concurrency in plan.levels:
        n = plan.requests[concurrency]
        round_timeout = max(60.0, plan.request_timeout * (n / concurrency + 1))
        if plan.warmup_per_level:
            # One unmeasured batch at this concurrency on each server: shapes seen once.
            for name in SERVERS:
                if time.monotonic() > deadline:
                    break
                await run_round(
                    by_name[name].base_url,
                    prompts,
                    min(n, concurrency),
                    concurrency,
                    plan.max_tokens,
                    plan.request_timeout,
                    round_timeout,
                )
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
        for r in range(plan.rounds):
            for name in SERVERS:  # interleaved: ssrl, vllm, ssrl, vllm, ...
                if time.monotonic() > deadline:
                    print(f"  deadline reached; skipping the rest of c={concurrency}", flush=True)
                    break
                other = by_name["vllm" if name == "ssrl" else "ssrl"]
                cpu_before, other_before = by_name[name].cpu_seconds(), other.cpu_seconds()
                machine_before, own_before = machine_cpu_seconds(), own_cpu_seconds()
                rd = await run_round(
                    by_name[name].base_url,
                    prompts,
                    n,
                    concurrency,
                    plan.max_tokens,
                    plan.request_timeout,
                    round_timeout,
                )
                rd["cpu_s"] = cpu_delta(cpu_before, by_name[name].cpu_seconds())
                other_after = other.cpu_seconds()
                rd["other_server_cpu_s"] = sum(other_after.values()) - sum(other_before.values())
                rd["client_cpu_s"] = own_cpu_seconds() - own_before
                # CPU used by everything else on the machine (other users' work): noise.
                rd["background_cpu_s"] = max(
                    0.0,
                    machine_cpu_seconds()
                    - machine_before
                    - sum(rd["cpu_s"].values())
                    - rd["other_server_cpu_s"]
                    - rd["client_cpu_s"],
                )
                rounds[name].append(rd)
                ok = [x for x in rd["requests"] if x["ok"]]
                toks = sum(x["completion_tokens"] for x in ok)
                print(
                    f"  c={concurrency:<3} round {r + 1}/{plan.rounds} {name:<5} "
                    f"{len(ok)}/{n} ok  {rd['wall_s']:.1f} s  {toks / rd['wall_s']:.1f} tok/s  "
                    f"other load {rd['background_cpu_s'] / rd['wall_s']:.2f} cores",
                    flush=True,
                )
        summaries = {name: summarize(rounds[name]) for name in SERVERS if rounds[name]}
        for name in SERVERS:  # the texts of the first round, for a look at what each produced
            if rounds[name]:
                summaries[name]["first_round_texts"] = [x["text"] for x in rounds[name][0]["requests"]][:8]
        same = None
        if rounds["ssrl"] and rounds["vllm"]:
            a = [x["text"] for x in rounds["ssrl"][0]["requests"]]
            b = [x["text"] for x in rounds["vllm"][0]["requests"]]
            same = sum(1 for x, y in zip(a, b, strict=False) if x == y) / max(1, len(a))
            if same < 0.5:
                print(
                    f"  WARNING: only {same:.0%} of completions are identical at "
                    f"c={concurrency}: the servers are not running the same workload",
                    flush=True,
                )
        levels_out.append(
            {
                "concurrency": concurrency,
                "requests_per_round": n,
                "rounds": plan.rounds,
                "identical_outputs_fraction": same,
                "results": summaries,
            }
        )
    return levels_out


def level_ratios(level: dict[str, Any]) -> dict[str, Any]:
    s, v = level["results"].get("ssrl"), level["results"].get("vllm")
    if not s or not v:
        return {}
    out = {
        "requests_per_s": ratio(s["requests_per_s"], v["requests_per_s"]),
        "output_tokens_per_s": ratio(s["output_tokens_per_s"], v["output_tokens_per_s"]),
        "latency_p50": ratio(s["latency_p50_s"], v["latency_p50_s"]),
        "ttft_p50": ratio(s["ttft_p50_s"], v["ttft_p50_s"]),
    }
    # Paired rounds (ssrl round i against vLLM round i, run back to back) cancel slow drift
    # of the machine's other load; their median is a second view on the pooled ratio.
    paired = [
        ratio(a["output_tokens_per_s"], b["output_tokens_per_s"])
        for a, b in zip(s["rounds"], v["rounds"], strict=False)
    ]
    paired = [x for x in paired if x is not None]
    out["paired_round_tok_s_ratios"] = [round(x, 3) for x in paired]
    out["paired_round_tok_s_ratio_median"] = statistics.median(paired) if paired else None
    t = TARGETS
    out["meets"] = {
        "requests_per_s": None
        if out["requests_per_s"] is None
        else out["requests_per_s"] >= t["throughput_ratio_min"],
        "output_tokens_per_s": None
        if out["output_tokens_per_s"] is None
        else out["output_tokens_per_s"] >= t["throughput_ratio_min"],
        "latency_p50": None
        if out["latency_p50"] is None
        else out["latency_p50"] <= t["p50_latency_ratio_max"],
    }
    return out


# --------------------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:.0f} ms"


def _gib(x: int | None) -> str:
    return "–" if not x else f"{x / 2**30:.2f} GiB"


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    cfg = report["config"]
    lines = [
        "## Serving: ssrl vs vLLM OpenAI server",
        "",
        "Written by `bench/serving.py`; raw figures in `bench/results/serving.json`.",
        "",
        "Both servers serve the same converted checkpoint (SmolLM2-135M-Instruct, "
        f"`{cfg['model_dir']}`) with the same engine options "
        f"(`--max-model-len {MAX_MODEL_LEN} --enable-prefix-caching"
        f"{' --enforce-eager' if cfg['enforce_eager'] else ''}"
        f"{' --block-size ' + block if (block := _block_size(cfg)) else ''}`, "
        f"`VLLM_CPU_KVCACHE_SPACE={KVCACHE_GIB}`"
        + "".join(
            f", `{k}={v}`" for k, v in (cfg.get("anchor_env") or {}).items() if k != "VLLM_CPU_KVCACHE_SPACE"
        )
        + "), on loopback ports, both running for the "
        "whole benchmark. ssrl runs vLLM's `AsyncLLM` in process behind its own FastAPI routes; "
        "the baseline is `python -m vllm.entrypoints.openai.api_server` of the same vllm-cpu.",
    ]
    if cfg.get("anchor_defaults"):
        lines += [
            "",
            "**vLLM's server on its own defaults** (`--anchor-defaults`): the anchor gets none of "
            "the engine settings ssrl chooses on this CPU (`--block-size 32`, and on 2 cores the "
            "model's threads on both cores instead of one core reserved for vLLM's scheduler); "
            "this compares what each server does out of the box, the engine included, not the "
            "front ends alone.",
        ]
    if any(a == "--no-self-search" for a in cfg["server_argv"].get("ssrl", [])):
        lines += [
            "",
            "ssrl runs with `--no-self-search`, i.e. plain chat generation as vLLM serves it. "
            "Its self-search loop (on by default for chat) is a different workload: it generates "
            "a search trajectory (streamed as `reasoning` deltas) before the answer (the `content`), "
            "so its text, token counts and time to first content are not those of a plain "
            "OpenAI server.",
        ]
    if cfg["enforce_eager"]:
        lines += [
            "",
            "**Eager mode.** Both ran with `--enforce-eager`: with torch.compile each server takes "
            "about 105 s to start on this machine, eager about 20 to 50 s. Absolute figures are "
            "those of eager execution for both servers; the ratios compare like with like.",
        ]
    lines += [
        "",
        "### Machine",
        "",
        machine_markdown(m).rstrip(),
        "",
        "### Command",
        "",
        "```",
        report["command"],
        "```",
        "",
        "Servers, as started (ports chosen free at run time):",
        "",
        "```",
        *(
            shlex.join(["python" if i == 0 else a for i, a in enumerate(cfg["server_argv"][name])])
            for name in SERVERS
        ),
        "```",
        "",
        f"Source: commit `{(report.get('source') or {}).get('commit') or 'unknown'}`"
        + (
            " with uncommitted changes under server/, router/ or clients/"
            if (report.get("source") or {}).get("uncommitted_server_changes")
            else ""
        )
        + ".",
        "",
        "### Method",
        "",
        f"- Load: streaming chat completions through httpx (async), `temperature: 0`, "
        f"`max_tokens: {cfg['max_tokens']}`, `stream_options.include_usage: true`; prompts are "
        f'{cfg["prompts"]} NQ-open dev questions (`"<question>? Answer in a few sentences."`, '
        "one user message), request *i* uses prompt *i* mod "
        f"{cfg['prompts']}. No `ignore_eos` (vLLM-only): output tokens are counted from `usage`.",
        f"- Per concurrency level: {'one unmeasured warm-up batch per server, then ' if cfg['warmup_per_level'] else ''}"
        f"{cfg['rounds']} rounds per server, interleaved (ssrl, vLLM, ssrl, vLLM, ...), "
        "each round a fresh client sending N requests with at most c in flight. "
        "Figures pool the rounds: req/s and output tok/s = completed requests / summed output "
        "tokens over the summed round wall time; latency = request sent to `[DONE]`; TTFT = "
        "request sent to the first non-empty content delta.",
        "- Memory: RSS summed over each server's process tree (API process + engine core + "
        "helpers), sampled every 0.5 s for the whole run; the peak is reported. Shared pages "
        "count once per process for both servers alike.",
        "- CPU s/request: user+system CPU time of the front-end (HTTP/API) process and of its "
        "children (engine core) during that server's rounds, per completed request. "
        "Other load: CPU time used meanwhile by processes outside both servers and the load "
        "generator, in cores (the machine is shared; 0 means a quiet machine).",
        "",
        "### Results",
        "",
    ]
    for level in report["levels"]:
        c = level["concurrency"]
        lines += [
            f"#### Concurrency {c} ({level['requests_per_round']} requests per round, "
            f"{level['rounds']} rounds each)",
            "",
            "| Server | req/s | output tok/s | tok/s per round | p50 latency | p99 latency "
            "| p50 TTFT | p99 TTFT | mean out tokens | errors | front-end CPU s/req "
            "| engine CPU s/req | other load (cores) |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in SERVERS:
            s = level["results"].get(name)
            if not s:
                continue
            per_round = ", ".join(number(r["output_tokens_per_s"], 1) for r in s["rounds"])
            lines.append(
                f"| {'ssrl' if name == 'ssrl' else 'vLLM'} | {number(s['requests_per_s'])} "
                f"| {number(s['output_tokens_per_s'], 1)} | {per_round} "
                f"| {_ms(s['latency_p50_s'])} | {_ms(s['latency_p99_s'])} "
                f"| {_ms(s['ttft_p50_s'])} | {_ms(s['ttft_p99_s'])} "
                f"| {number(s['mean_completion_tokens'], 1)} | {s['errors']}/{s['requests']} "
                f"| {number(s['frontend_cpu_s_per_request'], 3)} "
                f"| {number(s['engine_cpu_s_per_request'], 3)} "
                f"| {number(s['background_cores_mean'], 2)} |"
            )
        same = level.get("identical_outputs_fraction")
        if same is not None:
            lines += ["", f"Identical completions (first round, ssrl vs vLLM): {same * 100:.0f}%."]
            if same < 0.5:
                lines[-1] += (
                    " **Most completions differ: the two servers did not run the same "
                    "workload, so these figures do not compare serving overhead.**"
                )
        lines.append("")

    t = TARGETS
    lines += [
        "### Ratios ssrl / vLLM",
        "",
        f"Targets: throughput ratio ≥ {t['throughput_ratio_min']}, p50 latency ratio ≤ "
        f"{t['p50_latency_ratio_max']}, peak memory ratio ≤ {t['memory_ratio_max']} "
        "(p50 TTFT is reported, without a target). The marks judge the pooled figures; "
        "the last column divides each ssrl round's tok/s by the vLLM round run right after it.",
        "",
        "| Concurrency | req/s | output tok/s | p50 latency | p50 TTFT "
        "| tok/s, paired rounds (median; each) |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for level in report["levels"]:
        r = level.get("ratios") or {}
        if not r:
            continue
        meets = r["meets"]
        lines.append(
            f"| {level['concurrency']} | {number(r['requests_per_s'], 3)} {mark(meets['requests_per_s'])} "
            f"| {number(r['output_tokens_per_s'], 3)} {mark(meets['output_tokens_per_s'])} "
            f"| {number(r['latency_p50'], 3)} {mark(meets['latency_p50'])} "
            f"| {number(r['ttft_p50'], 3)} "
            f"| {number(r['paired_round_tok_s_ratio_median'], 3)}; "
            f"{', '.join(number(x, 2) for x in r['paired_round_tok_s_ratios'])} |"
        )
    mem = report["memory"]
    lines += [
        "",
        "| Peak RSS (process tree) | ssrl | vLLM | ratio |",
        "|---|---:|---:|---:|",
        f"| whole run | {_gib(mem['peak_rss_bytes'].get('ssrl'))} "
        f"({mem['peak_processes'].get('ssrl')} processes) "
        f"| {_gib(mem['peak_rss_bytes'].get('vllm'))} ({mem['peak_processes'].get('vllm')} processes) "
        f"| {number(mem['ratio'], 3)} {mark(mem['meets'])} |",
        "",
    ]
    verdict = report["verdict"]
    if verdict["all_met"]:
        lines.append("**All targets met.**")
    else:
        lines.append("**Targets missed:** " + "; ".join(verdict["missed"]) + ".")
    timing = report["timing"]
    lines += [
        "",
        f"Run time: {timing['total_s'] / 60:.1f} min in all (server start-up ssrl "
        f"{number(timing['startup_s'].get('ssrl'), 0)} s, vLLM {number(timing['startup_s'].get('vllm'), 0)} s "
        f"until /health answered; load {timing['load_s'] / 60:.1f} min).",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--concurrency",
        type=parse_levels,
        default=parse_levels("1,8,32"),
        help="comma-separated concurrency levels (default 1,8,32)",
    )
    p.add_argument(
        "--requests-per-level",
        default=None,
        help="requests per round: one number for every level, or one per level "
        "(comma-separated); default 16 for c=1, 32 for c=8, 64 for c=32, else 2*c",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--rounds", type=int, default=2, help="measured rounds per server per level")
    p.add_argument("--prompts", type=int, default=64, help="distinct questions used")
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="NQ-open JSONL file")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    p.add_argument(
        "--markdown",
        type=Path,
        default=BENCHMARKS_MD,
        help="Markdown file whose serving section is replaced ('' to skip)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="pass --enforce-eager to both servers (skips ~105 s of torch.compile each)",
    )
    p.add_argument(
        "--model-dir", default=None, help="checkpoint directory (default: the converted embedded model)"
    )
    p.add_argument(
        "--no-warmup-per-level",
        dest="warmup_per_level",
        action="store_false",
        help="skip the unmeasured warm-up batch at each level",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds per server")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument(
        "--max-duration",
        type=float,
        default=3600.0,
        help="no new round starts after this many seconds of load",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for both servers")
    p.add_argument(
        "--render-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="write the Markdown section from a saved results file; run nothing",
    )
    p.add_argument(
        "--anchor-defaults",
        action="store_true",
        help="start vLLM's server on its own CPU defaults (KV block 128, one core reserved for "
        "its scheduler) instead of the engine settings ssrl chooses on this machine",
    )
    p.add_argument(
        "--ssrl-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for `ssrl serve` only, e.g. --ssrl-arg=--self-search "
        "(repeatable; by default ssrl serves plain chat like vLLM)",
    )
    return p


def requests_plan(levels: list[int], spec: str | None) -> dict[int, int]:
    if spec is None:
        return {c: DEFAULT_REQUESTS.get(c, 2 * c) for c in levels}
    values = [int(x) for x in spec.split(",") if x.strip()]
    if len(values) == 1:
        values = values * len(levels)
    if len(values) != len(levels) or any(v < 1 for v in values):
        raise SystemExit("--requests-per-level: give one number, or one per concurrency level")
    return dict(zip(levels, values, strict=True))


def resolve_model_dir(arg: str | None) -> str:
    if arg:
        path = Path(arg).expanduser().resolve()
    else:
        from router.engine.default_model import ensure_default_checkpoint

        path = ensure_default_checkpoint()
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"{path} is not a checkpoint directory (no config.json); run `ssrl model prepare` first"
        )
    return str(path)


def source_state() -> dict[str, Any]:
    """The commit benchmarked and whether the server code differed from it (read-only git)."""

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "server", "router", "clients")
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_server_changes": None if changed is None else bool(changed),
    }


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.render_from is not None:
        report = json.loads(args.render_from.read_text(encoding="utf-8"))
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
        print(f"wrote the serving section of {args.markdown} from {args.render_from}")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    t_start = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")

    source = source_state()
    model_dir = resolve_model_dir(args.model_dir)
    prompts = load_prompts(args.questions, args.prompts)
    plan = Plan(
        levels=args.concurrency,
        requests=requests_plan(args.concurrency, args.requests_per_level),
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        warmup_per_level=args.warmup_per_level,
        request_timeout=args.request_timeout,
        max_duration=args.max_duration,
    )
    log_dir = Path(tempfile.mkdtemp(prefix="ssrl-bench-serving-"))
    # ssrl decides its engine's CPU settings itself; the anchor gets them unless it runs on
    # vLLM's own defaults (--anchor-defaults).
    env = server_env(match_ssrl_engine=False)
    anchor_env = server_env(match_ssrl_engine=not args.anchor_defaults)
    ports = {name: free_port() for name in SERVERS}
    plan.servers = [
        Server(
            "ssrl",
            ssrl_argv(args.python, model_dir, ports["ssrl"], args.enforce_eager, args.ssrl_arg),
            ports["ssrl"],
            log_dir / "ssrl.log",
            env,
        ),
        Server(
            "vllm",
            vllm_argv(args.python, model_dir, ports["vllm"], args.enforce_eager, not args.anchor_defaults),
            ports["vllm"],
            log_dir / "vllm.log",
            anchor_env,
        ),
    ]
    command = " ".join([".venv/bin/python", "-m", "bench.serving", *map(shlex.quote, argv)])
    print(
        f"model: {model_dir}\nlogs: {log_dir}\nplan: {plan.requests} x {plan.rounds} rounds, "
        f"max_tokens={plan.max_tokens}",
        flush=True,
    )

    sampler = MemorySampler(plan.servers, interval=0.5, max_seconds=args.max_duration + 2 * 3600)
    sampler.start()
    levels: list[dict[str, Any]] = []
    load_s = 0.0
    try:
        for server in plan.servers:  # one after the other: 2 cores do not start two at once well
            print(f"starting {server.name}: {shlex.join(server.argv)}", flush=True)
            server.start()
            server.wait_ready(args.startup_timeout)
            t0 = time.perf_counter()
            warm = asyncio.run(
                run_round(
                    server.base_url,
                    prompts,
                    1,
                    1,
                    args.max_tokens,
                    args.request_timeout,
                    args.request_timeout,
                )
            )
            server.warmup_s = time.perf_counter() - t0
            if not warm["requests"][0]["ok"]:
                raise RuntimeError(
                    f"{server.name} warm-up failed: {warm['requests'][0]['error']}\n{tail(server.log_path)}"
                )
            print(
                f"  {server.name} healthy after {server.startup_s:.0f} s, warm-up request "
                f"{server.warmup_s:.1f} s",
                flush=True,
            )
        t_load = time.monotonic()
        levels = asyncio.run(run_levels(plan, prompts, t_load + args.max_duration))
        load_s = time.monotonic() - t_load
    finally:
        sampler.sample_once()
        sampler.stop()
        for server in reversed(plan.servers):
            server.stop()

    for level in levels:
        level["ratios"] = level_ratios(level)
    peak = dict(sampler.peak_rss)
    mem_ratio = ratio(peak.get("ssrl"), peak.get("vllm"))
    memory = {
        "peak_rss_bytes": peak,
        "peak_processes": dict(sampler.peak_processes),
        "samples": sampler.samples,
        "ratio": mem_ratio,
        "meets": None if mem_ratio is None else mem_ratio <= TARGETS["memory_ratio_max"],
    }
    missed = []
    labels = {"requests_per_s": "req/s", "output_tokens_per_s": "output tok/s", "latency_p50": "p50 latency"}
    for level in levels:
        for key, ok in (level["ratios"].get("meets") or {}).items():
            if ok is False:
                value = level["ratios"][key]
                missed.append(f"{labels[key]} at c={level['concurrency']} ({value:.3f})")
    if memory["meets"] is False:
        missed.append(f"peak memory ({mem_ratio:.3f})")
    total_s = time.monotonic() - t_start
    report = {
        "benchmark": "serving: ssrl vs vLLM OpenAI server",
        "started_at": started_at,
        "command": command,
        "machine": machine_info(),
        "source": source,
        "config": {
            "model_dir": model_dir,
            "served_model_name": MODEL_NAME,
            "max_model_len": MAX_MODEL_LEN,
            "enforce_eager": args.enforce_eager,
            "anchor_defaults": args.anchor_defaults,
            "anchor_env": {k: v for k, v in anchor_env.items() if k.startswith("VLLM_CPU_")},
            "kvcache_gib": int(KVCACHE_GIB),
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "prompts": len(prompts),
            "prompt_template": PROMPT_TEMPLATE,
            "requests_per_round": {str(k): v for k, v in plan.requests.items()},
            "warmup_per_level": args.warmup_per_level,
            "server_argv": {s.name: s.argv for s in plan.servers},
        },
        "targets": TARGETS,
        "levels": levels,
        "memory": memory,
        "timing": {
            "total_s": total_s,
            "load_s": load_s,
            "startup_s": {s.name: s.startup_s for s in plan.servers},
            "first_request_s": {s.name: s.warmup_s for s in plan.servers},
        },
        "verdict": {"all_met": not missed and bool(levels), "missed": missed},
        "logs": str(log_dir),
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    if str(args.markdown) not in ("", "."):  # Path("") is "."
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
        print(f"wrote the serving section of {args.markdown}")
    print(summary_text(report))
    return 0


def summary_text(report: dict[str, Any]) -> str:
    out = []
    for level in report["levels"]:
        for name in SERVERS:
            s = level["results"].get(name)
            if s:
                out.append(
                    f"c={level['concurrency']:<3} {name:<5} {s['requests_per_s']:.2f} req/s "
                    f"{s['output_tokens_per_s']:.1f} tok/s p50 {_ms(s['latency_p50_s'])} "
                    f"p99 {_ms(s['latency_p99_s'])} TTFT p50 {_ms(s['ttft_p50_s'])} "
                    f"errors {s['errors']}"
                )
        r = level.get("ratios") or {}
        if r:
            out.append(
                f"       ratios: req/s {number(r['requests_per_s'], 3)} tok/s "
                f"{number(r['output_tokens_per_s'], 3)} p50 lat {number(r['latency_p50'], 3)} "
                f"p50 TTFT {number(r['ttft_p50'], 3)}"
            )
    mem = report["memory"]
    out.append(
        f"peak RSS ssrl {_gib(mem['peak_rss_bytes'].get('ssrl'))} vLLM "
        f"{_gib(mem['peak_rss_bytes'].get('vllm'))} ratio {number(mem['ratio'], 3)}"
    )
    out.append(
        f"total {report['timing']['total_s']:.0f} s; "
        f"verdict: {'all targets met' if report['verdict']['all_met'] else report['verdict']['missed']}"
    )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
