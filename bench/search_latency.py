"""Search path latency: the result cache (hit vs miss) and the local index at 10k / 1M docs.

1. Cache, through `router.search.service.SearchService.from_backends` exactly as the server
   builds it (each backend wrapped in the resilience layer, one `SearchCache` outside):
   each NQ-open question is searched twice, the first call a miss (it reaches the backend),
   the second a hit. Two backends: the local Wikipedia-summaries index (~10k docs), and a
   loopback Search-R1 retriever that sleeps `--api-delay` seconds per call (a web API).
   Also the bare backend without any wrapper, to show what the resilience layer costs.
2. Local index: `bench/bench_local_index.py` on the default corpus (10k documents) and, with
   `--large`, on a synthetic 1M-document corpus (builds a ~1 GB index; minutes). Without
   `--large` the last 1M figures in bench/results/local_index.json are shown, dated.

    .venv/bin/python -m bench.search_latency [--queries 200] [--api-queries 30] [--api-delay 0.8] [--large]

Writes bench/results/search_latency.json and the "search-latency" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
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
from router.scoring import percentile

SECTION = "search-latency"
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "data" / "qa" / "nq_open_dev.jsonl"
DEFAULT_OUT = ROOT / "bench" / "results" / "search_latency.json"
LOCAL_INDEX_JSON = ROOT / "bench" / "results" / "local_index.json"
LARGE_DOCS = 1_000_000


def load_queries(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f, strict=False)]


def stats_ms(seconds: list[float]) -> dict[str, float | None]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "mean_ms": sum(ms) / len(ms) if ms else None,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=None),
    }


async def cache_hit_vs_miss(backend: Any, queries: list[str], k: int) -> dict[str, Any]:
    """Each query twice through a cached, resilient service: miss then hit."""
    from router.search.cache import SearchCache
    from router.search.service import SearchService

    cache = SearchCache(maxsize=max(1024, 2 * len(queries)), ttl_s=3600.0)
    service = SearchService.from_backends([backend], cache=cache)
    miss: list[float] = []
    hit: list[float] = []
    wrong = 0
    for query in queries:
        t0 = time.perf_counter()
        first = await service.search(query, k)
        miss.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        second = await service.search(query, k)
        hit.append(time.perf_counter() - t0)
        if (
            first.error
            or second.error
            or first.cache_hit
            or not second.cache_hit
            or [d.title for d in first.documents] != [d.title for d in second.documents]
        ):
            wrong += 1
    return {
        "miss": stats_ms(miss),
        "hit": stats_ms(hit),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "unexpected": wrong,
    }


async def bare(backend: Any, queries: list[str], k: int) -> dict[str, Any]:
    """The backend called directly (no resilience layer, no cache, no service)."""
    times = []
    for query in queries:
        t0 = time.perf_counter()
        await backend.search(query, k)
        times.append(time.perf_counter() - t0)
    return stats_ms(times)


async def wrapped_uncached(backend: Any, queries: list[str], k: int) -> dict[str, Any]:
    from router.search.service import SearchService

    service = SearchService.from_backends([backend])
    times = []
    for query in queries:
        t0 = time.perf_counter()
        await service.search(query, k)
        times.append(time.perf_counter() - t0)
    return stats_ms(times)


async def cache_part(args: argparse.Namespace) -> dict[str, Any]:
    from bench.routing import LoopbackRetriever, default_index
    from router.search.local_index import LocalIndexBackend
    from router.search.providers.retriever import RetrieverBackend

    queries = load_queries(args.questions, args.queries)
    index = default_index()
    local = LocalIndexBackend(index)
    for q in queries[:20]:  # page cache and connection pool warm
        await local.search(q, args.k)
    result: dict[str, Any] = {"k": args.k}
    result["local"] = {
        "documents_index": str(index),
        "bare": await bare(local, queries, args.k),
        "resilient_uncached": await wrapped_uncached(local, queries, args.k),
        **await cache_hit_vs_miss(local, queries, args.k),
    }
    await local.aclose()
    api_queries = queries[: args.api_queries]
    with LoopbackRetriever(index, args.api_delay) as retriever:
        remote = RetrieverBackend(base_url=retriever.base_url)
        await remote.search("warm up", args.k)
        before = retriever.queries
        measured = await cache_hit_vs_miss(remote, api_queries, args.k)
        measured["provider_queries"] = retriever.queries - before
        await remote.aclose()
    result["retriever"] = {"delay_s": args.api_delay, **measured}
    return result


def local_index_part(args: argparse.Namespace) -> dict[str, Any]:
    """Run bench/bench_local_index.py (10k; 1M with --large) and read its merged results."""
    script = ROOT / "bench" / "bench_local_index.py"
    runs = [[]] + ([["--docs", str(LARGE_DOCS)]] if args.large else [])
    for extra in runs:
        cmd = [
            sys.executable,
            str(script),
            "--questions",
            str(args.questions),
            "--num-queries",
            str(args.queries),
            *extra,
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=3600, stdout=subprocess.DEVNULL)
    data = json.loads(LOCAL_INDEX_JSON.read_text(encoding="utf-8"))
    out = {"10k": data.get("wiki-summaries"), "1M": data.get(f"synthetic-{LARGE_DOCS}")}
    out["1M_measured_now"] = bool(args.large)
    return out


def _ms(value: Any) -> str:
    return "–" if value is None else (f"{value:.3f}" if value < 10 else f"{value:.1f}")


def markdown(result: dict[str, Any], command: str) -> str:
    c = result["cache"]
    local, remote = c["local"], c["retriever"]
    li = result["local_index"]
    lines = [
        "## Search path latency: cache hit vs miss, local index size",
        "",
        "Written by `bench/search_latency.py`; raw figures in `bench/results/search_latency.json`.",
        "",
        machine_markdown(result["machine"]),
        f"Command: `{command}`.",
        "",
        load_line(result),
        "",
        "### Result cache",
        "",
        "Through `SearchService.from_backends` as the server builds it (resilience layer per "
        "backend, `SearchCache` outside it). Each NQ-open question is searched twice: the first "
        f"call misses (reaches the backend), the second hits. k = {c['k']}. The retriever is a "
        f"loopback Search-R1 `POST /retrieve` server that sleeps {remote['delay_s']} s per call, "
        "then searches the same local index.",
        "",
        "| backend | path | queries | mean (ms) | p50 (ms) | p99 (ms) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("local index (10k)", "bare backend, no wrapper", local["bare"]),
        ("local index (10k)", "resilience layer, no cache", local["resilient_uncached"]),
        ("local index (10k)", "cache miss", local["miss"]),
        ("local index (10k)", "cache hit", local["hit"]),
        (f"retriever ({remote['delay_s']} s)", "cache miss", remote["miss"]),
        (f"retriever ({remote['delay_s']} s)", "cache hit", remote["hit"]),
    ]
    for backend, path, s in rows:
        lines.append(
            f"| {backend} | {path} | {s['n']} | {_ms(s['mean_ms'])} | {_ms(s['p50_ms'])} | {_ms(s['p99_ms'])} |"
        )
    lines += [
        "",
        f"Cache counters: local {local['cache_hits']} hits / {local['cache_misses']} misses; retriever "
        f"{remote['cache_hits']} hits / {remote['cache_misses']} misses, the provider saw "
        f"{remote['provider_queries']} queries for {2 * remote['hit']['n']} searches. Unexpected "
        f"outcomes (error, wrong hit/miss flag, different documents on the hit): "
        f"{local['unexpected'] + remote['unexpected']}.",
        "",
        "### Local FTS5 index at 10k and 1M documents",
        "",
        "From `bench/bench_local_index.py` (synchronous `search_sync`, k = 5, NQ-open questions "
        "as queries; the 1M corpus is synthetic, drawn from the summaries' word frequencies).",
        "",
        "| corpus | documents | index size | build | queries | p50 (ms) | p99 (ms) | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label in ("10k", "1M"):
        r = li.get(label)
        if not r:
            lines.append(f"| {label} | – | – | – | – | – | – | not measured (`--large`) |")
            continue
        lines.append(
            f"| {r['corpus']} | {r['documents']:,} | {r['index_mb']} MB | {r['build_s']} s | "
            f"{r['queries']} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {r['measured_at']} |"
        )
    if not li.get("1M_measured_now"):
        lines += ["", "The 1M row is the last `--large` run recorded in bench/results/local_index.json."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=200, help="questions searched against the local index")
    p.add_argument(
        "--api-queries", type=int, default=30, help="questions searched against the slow retriever"
    )
    p.add_argument(
        "--api-delay", type=float, default=0.8, help="seconds the loopback retriever sleeps per call"
    )
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--large", action="store_true", help="also build and measure a 1M-document index")
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    result = {
        "machine": machine_info(),
        "cache": asyncio.run(cache_part(args)),
        "local_index": local_index_part(args),
    }
    result["load_avg_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
    atomic_write_json(args.out, result)
    command = (
        f"python -m bench.search_latency --queries {args.queries} --api-queries {args.api_queries} "
        f"--api-delay {args.api_delay}" + (" --large" if args.large else "")
    )
    text = markdown(result, command)
    replace_markdown_section(args.markdown, SECTION, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
