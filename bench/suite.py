"""`make bench`: every benchmark, one after the other, each writing its own JSON and section.

Parts (each runs as its own process, so one failing does not stop the others):

| part | script | JSON | docs/benchmarks.md section |
|---|---|---|---|
| serving | bench.serving (ssrl vs vLLM's OpenAI server) | serving.json | serving |
| loop | bench.loop (loop overhead, cost of logprobs) | loop.json | loop |
| search-latency | bench.search_latency (cache hit/miss, local index 10k; 1M with --large) | search_latency.json | search-latency |
| routing | bench.routing (latency and calls saved with a 0.8 s search API) | routing.json | routing |

    .venv/bin/python -m bench.suite                       # everything
    .venv/bin/python -m bench.suite --parts routing,search-latency
    .venv/bin/python -m bench.suite --skip serving --quick
    .venv/bin/python -m bench.suite --routing-args "--questions 40 --delay 1.5"

`--quick` shrinks every part (fewer rounds and questions) for a smoke run; its figures are
noisier. The suite's own record (status and duration of each part) goes to
bench/results/suite.json and the "suite" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    BENCHMARKS_MD,
    ROOT,
    replace_markdown_section,
)
from clients.files import atomic_write_json

RESULTS = ROOT / "bench" / "results"
PARTS: dict[str, dict[str, Any]] = {
    "serving": {
        "module": "bench.serving",
        "json": "serving.json",
        "args": ["--enforce-eager", "--rounds", "4"],
        "quick": ["--enforce-eager", "--concurrency", "1,8", "--rounds", "1"],
    },
    "loop": {
        "module": "bench.loop",
        "json": "loop.json",
        "args": [],
        "quick": ["--questions", "4", "--rounds", "1"],
    },
    "search-latency": {
        "module": "bench.search_latency",
        "json": "search_latency.json",
        "args": [],
        "quick": ["--queries", "50", "--api-queries", "10"],
    },
    "routing": {"module": "bench.routing", "json": "routing.json", "args": [], "quick": ["--questions", "6"]},
}


def part_command(name: str, args: argparse.Namespace) -> list[str]:
    spec = PARTS[name]
    argv = list(spec["quick"] if args.quick else spec["args"])
    if name == "search-latency" and args.large:
        argv.append("--large")
    extra = getattr(args, name.replace("-", "_") + "_args") or ""
    return [args.python, "-m", spec["module"], *argv, *shlex.split(extra)]


def run_part(name: str, command: list[str], timeout: float) -> dict[str, Any]:
    print(f"\n=== {name}: {shlex.join(command)}", flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, timeout=timeout)
        rc: int | None = proc.returncode
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        rc, status = None, "timed out"
    seconds = time.monotonic() - started
    json_path = RESULTS / PARTS[name]["json"]
    return {
        "status": status,
        "returncode": rc,
        "seconds": round(seconds, 1),
        "command": shlex.join(command[1:]),
        "json": str(json_path.relative_to(ROOT)),
        "json_exists": json_path.is_file(),
    }


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "## Suite: last `make bench` run",
        "",
        f"Written by `bench/suite.py` ({record['finished_at']}); each part writes its own section.",
        "",
        "| part | status | duration | command | results |",
        "|---|---|---:|---|---|",
    ]
    for name, part in record["parts"].items():
        lines.append(
            f"| {name} | {part['status']} | {part['seconds'] / 60:.1f} min | "
            f"`python {part['command']}` | `{part['json']}` |"
        )
    if record["skipped"]:
        lines += ["", "Not run this time: " + ", ".join(record["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from: {', '.join(PARTS)}")
    p.add_argument("--skip", default="", help="parts to leave out")
    p.add_argument("--quick", action="store_true", help="smaller runs of every part (smoke test)")
    p.add_argument("--large", action="store_true", help="search-latency also builds a 1M-document index")
    p.add_argument("--part-timeout", type=float, default=3 * 3600.0, help="seconds per part")
    p.add_argument("--python", default=sys.executable)
    for name in PARTS:
        p.add_argument(f"--{name}-args", default=None, help=f"extra arguments for {PARTS[name]['module']}")
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    p.add_argument("--out", type=Path, default=RESULTS / "suite.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [n.strip() for n in args.parts.split(",") if n.strip()]
    skipped = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = sorted((set(chosen) | skipped) - set(PARTS))
    if unknown:
        print(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    started = datetime.now(UTC).isoformat(timespec="seconds")
    parts: dict[str, Any] = {}
    for name in PARTS:
        if name in chosen and name not in skipped:
            parts[name] = run_part(name, part_command(name, args), args.part_timeout)
    record = {
        "started_at": started,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "parts": parts,
        "skipped": [n for n in PARTS if n not in parts],
    }
    atomic_write_json(args.out, record)
    if parts:
        replace_markdown_section(args.markdown, "suite", markdown(record))
    print("\n" + markdown(record))
    return 0 if all(p["status"] == "ok" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
