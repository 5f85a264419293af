"""Soak benchmark (not a test): sustained mixed load against a running ssrl server.

Keeps `--concurrency` requests in flight for `--duration` seconds, rotating through
streamed self-search chats with policy `never` and `always` and plain completions (the mix of
tests/e2e/test_reliability.py's load test, for longer), and every `--interval` seconds prints
requests, errors, throughput, latency percentiles and the RSS of the server's whole process
tree (the server and its vLLM engine core), measured against a baseline taken after a
warm-up. At the end it prints a summary (and writes it as JSON with `--json`), and exits 1
when any request failed or the RSS grew by more than `--max-growth-mib`.

    .venv/bin/python -m clients.cli serve --enforce-eager --max-model-len 2048 &
    .venv/bin/python -m bench.soak --url http://127.0.0.1:8000 --duration 600

The server's process is found by the port it listens on (or give `--pid`); without access
to it the RSS columns are left out. A request counts as an error when it is not a 200, when
its stream does not end with `data: [DONE]` or carries an error event, or when a chat stream
has no self-search trace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

QUESTIONS = (
    "Who painted the Mona Lisa?",
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "Where is Mount Everest?",
)
KINDS = ("never", "always", "completion")


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 20:
            self.samples.append(what)


def request_for(i: int, model: str, max_tokens: int) -> tuple[str, str, dict[str, Any]]:
    kind = KINDS[i % len(KINDS)]
    if kind == "completion":
        return (
            kind,
            "/v1/completions",
            {
                "model": model,
                "prompt": f"Count to {i % 50}: 1, 2,",
                "max_tokens": 8,
                "temperature": 0,
                "stream": i % 2 == 0,
            },
        )
    return (
        kind,
        "/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "self_search": {"policy": kind},
        },
    )


def check(kind: str, body: dict[str, Any], response: httpx.Response) -> str | None:
    """None when the answer is whole and error-free, else what is wrong."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:160]}"
    if not body.get("stream"):
        return None if response.json().get("choices") else "no choices"
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    if not events or events[-1] != "[DONE]":
        return "stream did not end with [DONE]"
    if any(isinstance(e, dict) and "error" in e for e in events):
        return f"error event: {str(events[-2])[:160]}"
    if kind != "completion" and not any(
        (c.get("self_search") or {}).get("type") == "trace" for e in events[:-1] for c in e["choices"]
    ):
        return "chat stream without a trace"
    return None


def server_pid(url: str) -> int | None:
    port = urlsplit(url).port or 80
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    except (psutil.AccessDenied, PermissionError):
        return None
    return None


def tree_rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(
        base_url=args.url.rstrip("/"), headers=headers, timeout=args.request_timeout, limits=limits
    ) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        pid = args.pid or server_pid(args.url)
        counter = 0

        async def worker(tally: Tally, deadline: float) -> None:
            nonlocal counter
            while time.monotonic() < deadline:
                i, counter = counter, counter + 1
                kind, path, body = request_for(i, model, args.max_tokens)
                started = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                    problem = check(kind, body, response)
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"[:160]
                tally.requests += 1
                tally.by_kind[kind] = tally.by_kind.get(kind, 0) + 1
                tally.latencies.append(time.perf_counter() - started)
                if problem is not None:
                    tally.error(f"{kind}: {problem}")

        # Warm-up: every kind a few times, so the baseline holds what the server keeps anyway.
        warm = Tally()
        await asyncio.gather(
            *(worker(warm, time.monotonic() + args.warmup) for _ in range(min(args.concurrency, 6)))
        )
        baseline = tree_rss(pid)
        print(
            f"soak: {args.url} model={model} pid={pid} concurrency={args.concurrency} "
            f"duration={args.duration:.0f}s; warm-up {warm.requests} requests, "
            f"{warm.errors} errors; baseline RSS {mib(baseline)} MiB",
            flush=True,
        )
        print(
            f"{'elapsed_s':>9} {'requests':>8} {'errors':>6} {'req/s':>6} {'p50_s':>6} "
            f"{'p95_s':>6} {'rss_mib':>8} {'growth_mib':>10}",
            flush=True,
        )

        tally = Tally()
        start = time.monotonic()
        deadline = start + args.duration
        workers = [asyncio.create_task(worker(tally, deadline)) for _ in range(args.concurrency)]
        peak = baseline or 0
        while not all(w.done() for w in workers):
            await asyncio.wait(workers, timeout=args.interval)
            rss = tree_rss(pid)
            peak = max(peak, rss or 0)
            elapsed = time.monotonic() - start
            growth = None if rss is None or baseline is None else rss - baseline
            print(
                f"{elapsed:9.0f} {tally.requests:8d} {tally.errors:6d} "
                f"{tally.requests / max(elapsed, 1e-9):6.2f} {percentile(tally.latencies, 0.5):6.2f} "
                f"{percentile(tally.latencies, 0.95):6.2f} {mib(rss):>8} "
                f"{'-' if growth is None else f'{growth / 2**20:+.0f}':>10}",
                flush=True,
            )
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - start
        await asyncio.sleep(2)  # let the server release what the last requests held
        final = tree_rss(pid)

    return {
        "url": args.url,
        "model": model,
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 1),
        "requests": tally.requests,
        "errors": tally.errors,
        "by_kind": tally.by_kind,
        "requests_per_s": round(tally.requests / elapsed, 2),
        "latency_p50_s": round(percentile(tally.latencies, 0.5), 3),
        "latency_p95_s": round(percentile(tally.latencies, 0.95), 3),
        "latency_mean_s": round(statistics.fmean(tally.latencies), 3) if tally.latencies else None,
        "rss_baseline_mib": None if baseline is None else round(baseline / 2**20),
        "rss_final_mib": None if final is None else round(final / 2**20),
        "rss_peak_mib": round(peak / 2**20) if peak else None,
        "rss_growth_mib": None if final is None or baseline is None else round((final - baseline) / 2**20),
        "error_samples": tally.samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's root URL")
    parser.add_argument("--api-key", default=os.environ.get("SSRL_API_KEY", ""))
    parser.add_argument("--model", default=None, help="default: the first /v1/models entry")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=24, help="token budget per chat")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between reports")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up load")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--pid", type=int, default=None, help="server pid (default: by port)")
    parser.add_argument(
        "--max-growth-mib", type=float, default=300.0, help="exit 1 when the RSS grew by more than this"
    )
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    args = parser.parse_args(argv)

    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    grew = summary["rss_growth_mib"]
    return 1 if summary["errors"] or (grew is not None and grew > args.max_growth_mib) else 0


if __name__ == "__main__":
    sys.exit(main())
