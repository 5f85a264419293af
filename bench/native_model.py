"""Native against guided, side by side on one server: `python -m bench.native_model`.

The same self-search chats (the first-impression questions) go to the embedded instruct model
in guided mode and to the native adapter (`smollm2-135m-ssrl`) in native mode, on one running
server, in alternating rounds so both see the same machine. Per model: requests per second
at the given concurrency, prompt and completion tokens per answer, how many trajectories
were well formed (a one-line query, a closed information block, an answer), external calls.
Writes JSON (`--out`) and the "Native model" section of docs/benchmarks.md.

    python -m bench.native_model --base-url http://127.0.0.1:8000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info, machine_markdown, replace_markdown_section

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "tests" / "data" / "first_impression.jsonl"
DOCS = ROOT / "docs" / "benchmarks.md"
MODELS = {"guided": "smollm2-135m-instruct", "native": "smollm2-135m-ssrl"}


def well_formed_trace(trace: dict[str, Any]) -> bool:
    """The trace of a well-formed trajectory: a search with a one-line query whose information
    block was closed (not cut by its budget), then an answer the model closed."""
    searches = trace.get("searches") or []
    if not searches or not trace.get("answered"):
        return False
    first = searches[0]
    query = str(first.get("query") or "")
    notes = trace.get("notes") or []
    # A block cut by its budget was never closed by the model; an answer the loop had to ask
    # for (max_turns reached) is not one the model chose to write.
    cut = any(("information" in n and "budget" in n) or "made to answer" in n for n in notes)
    return bool(query.strip()) and "\n" not in query.strip() and not cut


async def _one(client: httpx.AsyncClient, model: str, question: str, policy: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 256,
    }
    if policy:
        body["self_search"] = {"policy": policy}
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    data = response.json()
    choice = data["choices"][0]
    trace = choice.get("self_search") or {}
    return {
        "latency_s": time.perf_counter() - started,
        "prompt_tokens": data["usage"]["prompt_tokens"],
        "completion_tokens": data["usage"]["completion_tokens"],
        "well_formed": well_formed_trace(trace),
        "external_calls": trace.get("external_calls", 0),
        "answer": choice["message"].get("content") or "",
    }


async def run_model(
    base_url: str,
    headers: dict[str, str],
    model: str,
    questions: list[str],
    concurrency: int,
    policy: str | None,
) -> dict[str, Any]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for q in questions:
        queue.put_nowait(q)
    rows: list[dict[str, Any]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            rows.append(await _one(client, model, queue.get_nowait(), policy))

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "requests": len(rows),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(rows) / wall, 3),
        "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in rows), 1),
        "completion_tokens_mean": round(statistics.mean(r["completion_tokens"] for r in rows), 1),
        "well_formed": sum(r["well_formed"] for r in rows),
        "external_calls": sum(r["external_calls"] for r in rows),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "## Native model: requests per second and prompt tokens, side by side",
        "",
        "Written by `bench/native_model.py`; raw figures in `docs/reports/native-model/throughput.json`. "
        f"Command: `{report['command']}`; {report['questions']} first-impression questions per round, "
        f"concurrency {report['concurrency']}, {report['rounds']} rounds per model, alternating; "
        f"policy: {report['policy'] or 'the server default'}; one server serving both models.",
        "",
        "| model | mode | requests/s (per round) | prompt tokens per answer | completion tokens | well formed | external calls |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for key, name in MODELS.items():
        rounds = report["rounds_by_model"][key]
        rates = ", ".join(f"{r['requests_per_s']:.2f}" for r in rounds)
        last = rounds[-1]
        lines.append(
            f"| `{name}` | {key} | {rates} | {last['prompt_tokens_mean']:.0f} | {last['completion_tokens_mean']:.0f} | "
            f"{last['well_formed']}/{last['requests']} | {last['external_calls']} |"
        )
    ratio = report["throughput_ratio"]
    prompt = report["prompt_token_ratio"]
    lines += [
        "",
        f"Native / guided requests per second (mean of rounds): **{ratio:.2f}x**; prompt tokens per "
        f"answer, native / guided: **{prompt:.2f}**.",
        "",
        machine_markdown(report["machine"]),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.native_model", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("SSRL_API_KEY", "").split(",")[0] or None)
    p.add_argument("--questions", type=Path, default=QUESTIONS)
    p.add_argument("--limit", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--policy", default=None, help="self_search.policy (default: the server's)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reports" / "native-model" / "throughput.json")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = p.parse_args()
    rows = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    questions = [r["question"] for r in rows[: args.limit]]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    by_model: dict[str, list[dict[str, Any]]] = {k: [] for k in MODELS}
    for round_index in range(args.rounds):
        order = list(MODELS) if round_index % 2 == 0 else list(reversed(MODELS))
        for key in order:
            result = asyncio.run(
                run_model(
                    args.base_url.rstrip("/").removesuffix("/v1"),
                    headers,
                    MODELS[key],
                    questions,
                    args.concurrency,
                    args.policy,
                )
            )
            print(key, json.dumps(result))
            by_model[key].append(result)

    def mean_of(key: str, field: str) -> float:
        return statistics.mean(r[field] for r in by_model[key])

    report = {
        "command": "python -m bench.native_model " + " ".join(f"--rounds {args.rounds}".split()),
        "questions": len(questions),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "policy": args.policy,
        "rounds_by_model": by_model,
        "throughput_ratio": mean_of("native", "requests_per_s") / mean_of("guided", "requests_per_s"),
        "prompt_token_ratio": mean_of("native", "prompt_tokens_mean")
        / mean_of("guided", "prompt_tokens_mean"),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    if not args.no_docs:
        replace_markdown_section(DOCS, "native-model-throughput", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
