"""Where each server spends its CPU under the same burst: py-spy over whole rounds (issue 18).

Starts ssrl (plain chat) and vLLM's OpenAI server exactly as bench/serving.py does (same model,
same engine options), warms both, then runs whole rounds of streaming chat completions on each
in turn (the first of the two alternating per round) while `py-spy record` samples that
server's whole process tree at 100 Hz. Each on-CPU sample is charged to the innermost frame of
code someone owns, walking from the leaf up: ssrl's own modules (`server/`, `router/`,
`clients/`), vLLM's serving layer (`vllm/entrypoints/`), vLLM's engine client in the API
process (`vllm/v1/engine/`, tokenizers, detokenisation), the rest of vLLM (the engine core's
scheduler and model), the HTTP stack (uvicorn, starlette, fastapi, h11/httptools, anyio),
pydantic, torch, the event loop itself (asyncio, uvloop); the rest of the standard library
(json, ...) is charged to its caller.

So the API process's samples per request say what each front end costs, and the "ssrl"
column is what ssrl's own code costs: its middlewares (auth, limits, metrics), the dispatch,
and with `--openai-serving auto` its own plain serving, which answers a chat that sets no field
it cannot honour (vLLM's serving classes, in process, answer the rest).

    .venv/bin/python -m bench.profile_serving                       # c = 32 and 64, 2 rounds each
    .venv/bin/python -m bench.profile_serving --concurrency 8 --rounds 1

Needs py-spy (`pip install -e '.[bench]'`). Writes bench/results/profile_serving.json, the
collapsed stacks under bench/results/profiles/ (flame graphs: `flamegraph.pl` or speedscope),
and the "profile" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import BENCHMARKS_MD, ROOT, machine_info, machine_markdown, replace_markdown_section
from bench.serving import (
    DEFAULT_QUESTIONS,
    Server,
    free_port,
    load_prompts,
    resolve_model_dir,
    run_round,
    running,
    server_env,
    source_state,
    ssrl_argv,
    vllm_argv,
)
from clients.files import atomic_write_json

SECTION = "profile"
DEFAULT_OUT = ROOT / "bench" / "results" / "profile_serving.json"
PROFILE_DIR = ROOT / "bench" / "results" / "profiles"
SAMPLE_RATE_HZ = 100
MAX_TOKENS = 64

# Owners, checked in this order on each frame's file path; the first match wins. A frame
# that matches none (the standard library, site-packages nobody here owns) is skipped, so
# its samples go to the nearest owned frame above it.
OWNERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ssrl", tuple(f"{ROOT}/{pkg}/" for pkg in ("server", "router", "clients"))),
    ("vllm serving layer", ("/vllm/entrypoints/",)),
    (
        "vllm engine client",
        (
            "/vllm/v1/engine/async_llm.py",
            "/vllm/v1/engine/output_processor.py",
            "/vllm/v1/engine/detokenizer.py",
            "/vllm/v1/engine/core_client.py",
            "/vllm/v1/engine/input_processor.py",
            "/vllm/v1/engine/logprobs.py",
            "/vllm/tokenizers/",
            "/vllm/transformers_utils/",
            "/tokenizers/",
            "/transformers/",
        ),
    ),
    ("torch", ("/torch/",)),
    ("vllm (engine, other)", ("/vllm/",)),
    (
        "http stack",
        ("/uvicorn/", "/starlette/", "/fastapi/", "/h11/", "/httptools/", "/anyio/", "/sse_starlette/"),
    ),
    ("pydantic", ("/pydantic/", "/pydantic_core/")),
    ("prometheus", ("/prometheus_client/",)),
    ("msgspec/zmq (IPC)", ("/msgspec/", "/zmq/")),
    # The event loop's own machinery (uvloop runs it in C: its samples stop at asyncio's
    # Runner or uvloop.run, whichever started the loop).
    ("event loop", ("/asyncio/", "/uvloop/")),
)
UNOWNED = "python/other"


def owner_of(path: str) -> str | None:
    for owner, needles in OWNERS:
        if any(n in path for n in needles):
            return owner
    return None


def parse_frame(frame: str) -> tuple[str, str]:
    """`name (path:line)` -> (name, path)."""
    if frame.endswith(")") and " (" in frame:
        name, _, rest = frame.partition(" (")  # names hold no " (", paths may
        return name, rest[:-1].rsplit(":", 1)[0]
    return frame, ""


def attribute(stacks: Iterable[tuple[list[str], int]]) -> dict[str, dict[str, Any]]:
    """Per process role (see `role_of`): samples by owner, and the leaf functions of the
    samples charged to ssrl (what its own code spends time on)."""
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"samples": 0, "owners": Counter(), "ssrl_functions": Counter(), "leaf_functions": Counter()}
    )
    for frames, count in stacks:
        # py-spy --subprocesses roots each stack in its process chain: the server's process,
        # then each child down to the one sampled (`process 1:"...";process 2:"..."`).
        chain = 0
        while chain < len(frames) and frames[chain].startswith("process "):
            chain += 1
        body = frames[chain:]
        if not body:
            continue
        entry = per[role_of(frames[:chain])]
        entry["samples"] += count
        owner, where = UNOWNED, ""
        for frame in reversed(body):
            name, path = parse_frame(frame)
            found = owner_of(path)
            if found is not None:
                owner, where = found, f"{name} ({path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]})"
                break
        entry["owners"][owner] += count
        entry["leaf_functions"][where or parse_frame(body[-1])[0]] += count
        if owner == "ssrl":
            entry["ssrl_functions"][where] += count
    return per


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy not found: pip install -e '.[bench]'")
    return found


def start_profiler(pid: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--rate",
            str(SAMPLE_RATE_HZ),
            "--format",
            "raw",
            "--full-filenames",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def stop_profiler(proc: subprocess.Popen, out: Path) -> str:
    """SIGINT makes py-spy write what it sampled; wait for the file."""
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {output.decode(errors='replace')[-500:]}")
    return output.decode(errors="replace")


def role_of(chain: list[str]) -> str:
    """The sampled process's role from its `process PID:"cmdline"` chain: the server's own
    process ("api", the first of the chain), vLLM's engine core, its worker, or the command."""
    if len(chain) <= 1:
        return "api"
    cmd = chain[-1].partition(":")[2].strip('"')
    if "EngineCore" in cmd:
        return "engine core"
    if "Worker" in cmd:
        return "engine worker"
    return "other (" + (cmd.split()[0].rsplit("/", 1)[-1] if cmd else "?") + ")"


def processes_of(profile: Path) -> dict[str, dict[str, Any]]:
    return {
        role: {
            "samples": slot["samples"],
            "owners": dict(slot["owners"].most_common()),
            "ssrl_functions": dict(slot["ssrl_functions"].most_common(12)),
            "leaf_functions": dict(slot["leaf_functions"].most_common(12)),
        }
        for role, slot in attribute(read_collapsed(profile)).items()
    }


async def profiled_round(
    server: Server, prompts: list[str], n: int, concurrency: int, out: Path, timeout: float
) -> dict[str, Any]:
    assert server.proc is not None
    profiler = start_profiler(server.proc.pid, out)
    await asyncio.sleep(1.0)  # py-spy attaches to every process of the tree
    cpu_before = server.cpu_seconds()
    t0 = time.perf_counter()
    result = await run_round(server.base_url, prompts, n, concurrency, MAX_TOKENS, timeout, timeout * 2)
    wall = time.perf_counter() - t0
    cpu_after = server.cpu_seconds()
    log = stop_profiler(profiler, out)
    ok = [r for r in result["requests"] if r["ok"]]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    return {
        "server": server.name,
        "concurrency": concurrency,
        "requests": n,
        "ok": len(ok),
        "wall_s": wall,
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in ok),
        "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
        "profile": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
        "py_spy_log": log[-300:],
        "processes": processes_of(out),
    }


async def run_profiles(
    servers: dict[str, Server], prompts: list[str], levels: list[int], rounds: int, timeout: float
) -> list[dict[str, Any]]:
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    names = list(servers)
    results = []
    for c in levels:
        n = 2 * c
        for server in servers.values():  # warm-up at this level, not profiled
            await run_round(server.base_url, prompts, c, c, MAX_TOKENS, timeout, timeout * 2)
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                out = PROFILE_DIR / f"{name}-c{c}-r{r + 1}.txt"
                row = await profiled_round(servers[name], prompts, n, c, out, timeout)
                api = row["processes"].get("api", {})
                print(
                    f"c={c} round {r + 1} {name}: {row['ok']}/{n} ok, {row['wall_s']:.1f} s, "
                    f"API samples {api.get('samples', 0)}, ssrl-owned {api.get('owners', {}).get('ssrl', 0)}",
                    flush=True,
                )
                results.append(row)
    return results


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level and server: per-request samples (10 ms each at 100 Hz) by process and owner."""
    table: dict[tuple[int, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["concurrency"], row["server"])
        s = table.setdefault(
            key,
            {
                "concurrency": key[0],
                "server": key[1],
                "requests": 0,
                "tokens": 0,
                "wall_s": 0.0,
                "api": Counter(),
                "engine": 0,
                "api_samples": 0,
                "ssrl_functions": Counter(),
                "api_cpu_s": 0.0,
            },
        )
        s["requests"] += row["ok"]
        s["tokens"] += row["completion_tokens"]
        s["wall_s"] += row["wall_s"]
        s["api_cpu_s"] += row["cpu_s"]["frontend"]
        api = row["processes"].get("api", {})
        s["api_samples"] += api.get("samples", 0)
        s["api"].update(api.get("owners", {}))
        s["ssrl_functions"].update(api.get("ssrl_functions", {}))
        s["engine"] += sum(p["samples"] for role, p in row["processes"].items() if role != "api")
    out = []
    for s in table.values():
        n = max(s["requests"], 1)
        ms = 1000.0 / SAMPLE_RATE_HZ
        out.append(
            {
                "concurrency": s["concurrency"],
                "server": s["server"],
                "requests": s["requests"],
                "tokens_per_s": s["tokens"] / s["wall_s"] if s["wall_s"] else None,
                "api_ms_per_request": s["api_samples"] * ms / n,
                "api_cpu_ms_per_request": s["api_cpu_s"] * 1000 / n,
                "engine_ms_per_request": s["engine"] * ms / n,
                "api_owner_ms_per_request": {k: v * ms / n for k, v in s["api"].most_common()},
                "ssrl_functions_ms_per_request": {
                    k: v * ms / n for k, v in s["ssrl_functions"].most_common(8)
                },
            }
        )
    return sorted(out, key=lambda r: (r["concurrency"], r["server"]))


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "## Profile: where each server's CPU goes under the same burst (py-spy)",
        "",
        "### Machine",
        "",
        machine_markdown(report["machine"]).rstrip(),
        "",
        f"Command: `{report['command']}`. Both servers as in the serving benchmark above "
        f"(`--enforce-eager`, prefix caching, the same KV block size; ssrl with "
        f"`--no-self-search`), streaming chat, {cfg['max_tokens']} tokens, temperature 0; per "
        f"level a warm-up round each, then {cfg['rounds']} profiled rounds of 2 x c requests per "
        f"server, the first of the two alternating. `py-spy record --subprocesses --rate "
        f"{SAMPLE_RATE_HZ} --nonblocking` over each whole round (API process, engine core and its "
        "worker); one on-CPU sample = 10 ms. Each sample is charged to the innermost frame of "
        "owned code (the standard library goes to its caller; see the module's docstring). "
        f"Collapsed stacks: `{cfg['profile_dir']}/`.",
        "",
        "### API process: CPU ms per request by owner",
        "",
    ]
    owners = [o for o, _ in OWNERS] + [UNOWNED]
    summary = report["summary"]
    present = [o for o in owners if any(r["api_owner_ms_per_request"].get(o) for r in summary)]
    lines.append(
        "| c | server | tok/s | "
        + " | ".join(present)
        + " | API total (py-spy) | API CPU (psutil) | engine procs |"
    )
    lines.append("|---:|---|---:|" + "---:|" * len(present) + "---:|---:|---:|")
    for r in summary:
        cells = [f"{r['api_owner_ms_per_request'].get(o, 0.0):.1f}" for o in present]
        lines.append(
            f"| {r['concurrency']} | {r['server']} | {r['tokens_per_s']:.1f} | "
            + " | ".join(cells)
            + f" | {r['api_ms_per_request']:.1f} | {r['api_cpu_ms_per_request']:.1f} | {r['engine_ms_per_request']:.0f} |"
        )
    lines += ["", "### ssrl's own code in the API process (ms per request, innermost ssrl frame)", ""]
    for r in summary:
        if r["server"] != "ssrl":
            continue
        funcs = (
            ", ".join(f"{k}: {v:.2f}" for k, v in r["ssrl_functions_ms_per_request"].items())
            or "none sampled"
        )
        lines.append(f"- c={r['concurrency']}: {funcs}")
    if report.get("findings"):
        lines += ["", "### Findings", "", report["findings"].rstrip()]
    lines += [
        "",
        f"Run time: {report['timing']['total_s'] / 60:.1f} min. Raw figures: `bench/results/profile_serving.json`.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.profile_serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="32,64", help="comma-separated levels (default 32,64)")
    p.add_argument("--rounds", type=int, default=2, help="profiled rounds per server per level")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD, help="'' to skip")
    p.add_argument("--findings-file", type=Path, default=None, help="Markdown for the 'Findings' part")
    p.add_argument("--render-from", type=Path, default=None, metavar="JSON", help="only rewrite the section")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--python", default=sys.executable)
    return p


def _findings(report: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        report["findings"] = path.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.render_from is not None:
        report = json.loads(args.render_from.read_text(encoding="utf-8"))
        # Re-read the collapsed stacks where they are still on disk (the attribution may
        # have changed since the run).
        for row in report["rounds"]:
            if (ROOT / row["profile"]).exists():
                row["processes"] = processes_of(ROOT / row["profile"])
        report["summary"] = summarize(report["rounds"])
        _findings(report, args.findings_file)
        atomic_write_json(args.render_from, report)
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
        print(f"wrote the {SECTION} section of {args.markdown}")
        return 0
    py_spy()  # fail before starting anything
    t_start = time.monotonic()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    model_dir = resolve_model_dir(args.model_dir)
    prompts = load_prompts(args.questions, args.prompts)
    env = server_env()
    log_dir = Path(tempfile.mkdtemp(prefix="ssrl-bench-profile-"))
    ports = {"ssrl": free_port(), "vllm": free_port()}
    servers = {
        "ssrl": Server(
            "ssrl",
            ssrl_argv(args.python, model_dir, ports["ssrl"], True),
            ports["ssrl"],
            log_dir / "ssrl.log",
            env,
        ),
        "vllm": Server(
            "vllm",
            vllm_argv(args.python, model_dir, ports["vllm"], True),
            ports["vllm"],
            log_dir / "vllm.log",
            env,
        ),
    }
    with running(servers.values(), args.startup_timeout):
        rows = asyncio.run(run_profiles(servers, prompts, levels, args.rounds, args.request_timeout))
    report = {
        "benchmark": "profile_serving: py-spy over whole rounds, ssrl vs vLLM's OpenAI server",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "-m", "bench.profile_serving", *argv]),
        "machine": machine_info(),
        "source": source_state(),
        "config": {
            "levels": levels,
            "rounds": args.rounds,
            "max_tokens": MAX_TOKENS,
            "sample_rate_hz": SAMPLE_RATE_HZ,
            "profile_dir": str(PROFILE_DIR.relative_to(ROOT)),
            "server_argv": {s.name: s.argv for s in servers.values()},
        },
        "rounds": rows,
        "summary": summarize(rows),
        "timing": {"total_s": time.monotonic() - t_start},
    }
    _findings(report, args.findings_file)
    atomic_write_json(args.out, report)
    if str(args.markdown) not in ("", "."):
        replace_markdown_section(args.markdown, SECTION, render_markdown(report))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
