"""What routing saves when the search API is slow: latency, external calls, accuracy.

A loopback search provider speaks Search-R1's retriever protocol (`POST /retrieve`) on
127.0.0.1: it sleeps `--delay` seconds (a realistic web-search API latency, 0.8 s by
default), then answers from the local Wikipedia-summaries index. `ssrl serve` runs the
embedded default model with that provider as its only backend (`--search retriever`, result
cache off so every external call pays the delay), and the same NQ-open questions are asked
under three policies, one request at a time:

- `never`: every search self-filled (no API call),
- `threshold`: tau on the mean query entropy, calibrated from the `never` run's entropies
  for `--target-call-rate` (0.5) with `router.calibration`,
- `always`: every search external (the Search-R1 / SSRL sim2real baseline).

Reported per policy: exact match, external calls (counted by the provider itself, and by
the traces), calls saved against `always`, mean / p50 / p99 request latency.

    .venv/bin/python -m bench.routing [--questions 20] [--delay 0.8] [--target-call-rate 0.5]

Writes bench/results/routing.json and the "routing" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BENCHMARKS_MD,
    ROOT,
    load_line,
    machine_info,
    machine_markdown,
    replace_markdown_section,
)
from clients.files import atomic_write_json

SECTION = "routing"
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "data" / "qa" / "nq_open_dev.jsonl"
DEFAULT_OUT = ROOT / "bench" / "results" / "routing.json"
POLICIES = ("never", "threshold", "always")


class LoopbackRetriever:
    """Search-R1's `POST /retrieve` on 127.0.0.1: sleep `delay_s`, then search a local index.

    Answers `{"result": [[{"document": {"id", "contents"}, "score"}]]}` (without
    `return_scores`, the documents alone), `contents` being `title + "\\n" + text`.
    Counts the queries it served.
    """

    def __init__(self, index_dir: Path, delay_s: float) -> None:
        self.index_dir = Path(index_dir)
        self.delay_s = delay_s
        self.queries = 0
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.base_url = ""

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from router.search.local_index import LocalIndexBackend

        backend = LocalIndexBackend(self.index_dir)

        async def retrieve(request: Request) -> JSONResponse:
            body = await request.json()
            queries = body.get("queries") or []
            topk = int(body.get("topk") or 3)
            with self._lock:
                self.queries += len(queries)
            await asyncio.sleep(self.delay_s)
            result = []
            for query in queries:
                docs = await backend.search(str(query), topk)
                hits = [
                    {"id": d.id or f"doc-{i}", "contents": f"{d.title}\n{d.text}"} for i, d in enumerate(docs)
                ]
                if body.get("return_scores"):
                    result.append(
                        [{"document": h, "score": d.score or 0.0} for h, d in zip(hits, docs, strict=True)]
                    )
                else:
                    result.append(hits)
            return JSONResponse({"result": result})

        return Starlette(routes=[Route("/retrieve", retrieve, methods=["POST"])])

    def start(self) -> str:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self._app(), log_level="warning", lifespan="off"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the loopback retriever did not start")
            time.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> LoopbackRetriever:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_index() -> Path:
    from router.engine.default_model import default_cache_dir
    from router.search.default_corpus import ensure_default_index

    return ensure_default_index(default_cache_dir(), progress=False)


def serve_supports_retriever(python: str) -> tuple[bool, str]:
    """Whether this tree's `ssrl serve` takes `--search retriever` and `--search-option`."""
    proc = subprocess.run(
        [python, "-m", "clients.cli", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = proc.stdout
    missing = [
        what
        for what, ok in (
            ("--search retriever", "retriever" in text),
            ("--search-option", "--search-option" in text),
        )
        if not ok
    ]
    return not missing, ", ".join(missing)


def ssrl_command(python: str, port: int, retriever_url: str, max_turns: int) -> list[str]:
    return [
        python,
        "-m",
        "clients.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--search",
        "retriever",
        "--search-option",
        f"retriever.base_url={retriever_url}",
        "--search-cache-size",
        "0",
        "--search-timeout",
        "30",
        "--max-turns",
        str(max_turns),
    ]


async def run_policy(
    base_url: str,
    data: Path,
    out: Path,
    policy: str,
    args: argparse.Namespace,
    threshold: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from clients.eval_cli import (
        RESULTS,
        EvalConfig,
        ResultsFile,
        final_rows,
        run_eval_async,
    )

    self_search: dict[str, Any] = {"policy": policy, "max_turns": args.max_turns}
    if threshold is not None:
        self_search.update(threshold=threshold, aggregate=args.aggregate)
    config = EvalConfig(
        base_url=base_url,
        data=data,
        out=out,
        limit=args.questions,
        concurrency=args.concurrency,
        self_search=self_search,
        progress=False,
        plots=False,
        timeout_s=300.0,
    )
    summary = await run_eval_async(config)
    rows = list(final_rows(ResultsFile(out / RESULTS).read()).values())
    return summary, rows


def search_seconds(rows: list[dict[str, Any]]) -> float | None:
    """Mean time of the external searches of a run, from the traces."""
    times = [
        s.get("latency_s") or 0.0
        for r in rows
        if r.get("error") is None
        for s in (r.get("trace") or {}).get("searches") or []
        if s.get("decision") == "external"
    ]
    return sum(times) / len(times) if times else None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from bench.serving import Server, free_port, server_env
    from clients.eval_cli import questions_of_run
    from router.calibration import calibrate

    load_start = os.getloadavg()[0]
    ok, missing = serve_supports_retriever(args.python)
    if not ok:
        raise SystemExit(
            f"`ssrl serve` lacks {missing}: the routing benchmark needs the Search-R1 retriever backend"
        )
    data = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="ssrl-bench-routing-"))
    results: dict[str, Any] = {}
    with LoopbackRetriever(default_index(), args.delay) as retriever:
        port = free_port()
        server = Server(
            "ssrl",
            ssrl_command(args.python, port, retriever.base_url, args.max_turns),
            port,
            work / "server.log",
            server_env(),
        )
        started = time.monotonic()
        server.start()
        try:
            server.wait_ready(args.startup_timeout)
            startup_s = time.monotonic() - started
            # Warm-up: two questions outside the measured set, external and self-filled.
            warm = work / "warmup.jsonl"
            with open(data, encoding="utf-8") as f:
                lines = [line for _, line in zip(range(args.questions + 2), f, strict=False)]
            warm.write_text("".join(lines[args.questions :]), encoding="utf-8")
            for policy in ("always", "never"):
                asyncio.run(run_policy(server.base_url, warm, work / f"warmup-{policy}", policy, args))

            threshold: float | None = None
            calibration: dict[str, Any] = {}
            rows_by_policy: dict[str, list[dict[str, Any]]] = {}
            for policy in POLICIES:
                if policy == "threshold":
                    cal = calibrate(
                        questions_of_run(rows_by_policy["never"]),
                        target_call_rate=args.target_call_rate,
                        aggregate=args.aggregate,
                    )
                    threshold = cal.threshold
                    calibration = {
                        "aggregate": cal.aggregate,
                        "threshold": threshold,
                        "target_call_rate": args.target_call_rate,
                        "predicted_call_rate": cal.point.call_rate,
                    }
                before = retriever.queries
                t0 = time.perf_counter()
                summary, rows = asyncio.run(
                    run_policy(
                        server.base_url,
                        data,
                        work / policy,
                        policy,
                        args,
                        threshold if policy == "threshold" else None,
                    )
                )
                wall = time.perf_counter() - t0
                results[policy] = {
                    "em": summary["em"],
                    "f1": summary["f1"],
                    "scored": summary["scored"],
                    "errors": summary["errors"],
                    "external_calls": summary["external_calls"],
                    "provider_queries": retriever.queries - before,
                    "searches": summary["searches"],
                    "external_call_rate": summary["external_call_rate"],
                    "fallbacks": summary["fallbacks"],
                    "latency_s": summary["latency_s"],
                    "mean_external_search_s": search_seconds(rows),
                    "completion_tokens": summary["tokens"]["completion"],
                    "wall_s": wall,
                }
                rows_by_policy[policy] = rows
        finally:
            server.stop()
    always_calls = results["always"]["external_calls"]
    for r in results.values():
        r["calls_saved_vs_always"] = (1 - r["external_calls"] / always_calls) if always_calls else None
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": machine_info(),
        "questions": args.questions,
        "data": str(data),
        "delay_s": args.delay,
        "concurrency": args.concurrency,
        "max_turns": args.max_turns,
        "calibration": calibration,
        "startup_s": startup_s,
        "policies": results,
        "work_dir": str(work) if args.keep else None,
        "load_avg_1m": {"start": load_start, "end": os.getloadavg()[0]},
    }


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _s(value: Any) -> str:
    return "–" if value is None else f"{value:.2f} s"


def markdown(result: dict[str, Any], command: str) -> str:
    cal = result["calibration"]
    lines = [
        "## Routing: latency and external calls saved with a slow search API",
        "",
        "Written by `bench/routing.py`; raw figures in `bench/results/routing.json`.",
        "",
        machine_markdown(result["machine"]),
        f"Command: `{command}`.",
        "",
        load_line(result),
        "",
        f"The embedded default model (SmolLM2-135M-Instruct, guided mode, `--enforce-eager`) answers "
        f"the first {result['questions']} NQ-open dev questions at temperature 0, one request at a "
        f"time (concurrency {result['concurrency']}), max_turns {result['max_turns']}. Its only search "
        "backend is a loopback Search-R1 retriever (`--search retriever`, result cache off) that "
        f"sleeps {result['delay_s']} s per call and then answers from the local Wikipedia-summaries "
        "index. The threshold policy's tau was calibrated on the `never` run's query entropies "
        f"for a {cal['target_call_rate']:.0%} call rate: aggregate `{cal['aggregate']}`, "
        f"tau {cal['threshold']:.4g} (predicted call rate {cal['predicted_call_rate']:.2f}).",
        "",
        "| policy | exact match | F1 | external calls (provider saw) | call rate | calls saved vs always "
        "| mean latency | p50 | p99 | mean external search | completion tokens / question |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in POLICIES:
        r = result["policies"][name]
        lat = r["latency_s"]
        saved = "–" if r["calls_saved_vs_always"] is None else f"{r['calls_saved_vs_always']:.0%}"
        lines.append(
            f"| {name} | {_f(r['em'])} | {_f(r['f1'])} | {r['external_calls']} ({r['provider_queries']}) "
            f"| {_f(r['external_call_rate'], 2)} | {saved} | {_s(lat['mean'])} | {_s(lat['p50'])} "
            f"| {_s(lat['p99'])} | {_s(r['mean_external_search_s'])} "
            f"| {r['completion_tokens'] / max(1, r['scored']):.1f} |"
        )
    errors = sum(r["errors"] for r in result["policies"].values())
    lines += [
        "",
        f"Errors: {errors}. One question is {100 / result['questions']:.0f} points of exact match "
        "here, so small accuracy differences between the policies are noise. A self-filled search "
        "costs generated tokens (the information block, up to `--max-information-tokens`) instead of "
        f"the provider's {result['delay_s']} s; inserted documents are prefill only.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--data", default=str(DEFAULT_QUESTIONS), help="QA JSONL ({id, question, answers})")
    p.add_argument("--delay", type=float, default=0.8, help="seconds the loopback provider sleeps per call")
    p.add_argument("--target-call-rate", type=float, default=0.5)
    p.add_argument("--aggregate", default="mean", choices=["mean", "max", "min_prob", "ssrl"])
    p.add_argument("--max-turns", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    p.add_argument("--keep", action="store_true", help="keep the run directories and server log")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    atomic_write_json(args.out, result)
    command = (
        f"python -m bench.routing --questions {args.questions} --delay {args.delay} "
        f"--target-call-rate {args.target_call_rate}"
    )
    text = markdown(result, command)
    replace_markdown_section(args.markdown, SECTION, text)
    print(text)
    print(json.dumps({k: v["latency_s"]["mean"] for k, v in result["policies"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
