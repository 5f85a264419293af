"""Native against guided, side by side: `python -m bench.native_model`.

The same self-search chats (the first-impression questions) go to the embedded instruct model
in guided mode and to the native adapter (`smollm2-135m-ssrl`) in native mode through vLLM's
LoRA, both on the default server (``--base-url``), and, with ``--merged-url``, to a second
server serving the adapter merged into a model of its own (``ssrl serve --model
smollm2-135m-ssrl``), in alternating rounds so all see the same machine (the idle server
waits). Per model: requests per second at the given concurrency, prompt and completion tokens
per answer, how many trajectories were well formed (a one-line query, a closed information
block, an answer), external calls. Writes JSON (`--out`) and the "Native model" section of
docs/benchmarks.md.

    python -m bench.native_model --base-url http://127.0.0.1:8000 --merged-url http://127.0.0.1:8001 --rounds 2
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
from train.render import well_formed

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "tests" / "data" / "first_impression.jsonl"
DOCS = ROOT / "docs" / "benchmarks.md"
# Key -> (served model, which server: "base" or "merged", mode).
MODELS = {
    "guided": ("smollm2-135m-instruct", "base", "guided"),
    "native": ("smollm2-135m-ssrl", "base", "native, LoRA"),
    "native-merged": ("smollm2-135m-ssrl", "merged", "native, merged"),
}


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
        # The transcript (`message.reasoning`) by the rule the eval report uses.
        "well_formed": well_formed(choice["message"].get("reasoning") or ""),
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
        f"policy: {report['policy'] or 'the server default'}; the instruct model and the adapter (LoRA) on one "
        "server, the merged native model on a second (`--model smollm2-135m-ssrl`) that waits while the "
        "first is measured.",
        "",
        "| model | mode | requests/s (per round) | prompt tokens per answer | completion tokens | well formed | external calls |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for key, (name, _, mode) in MODELS.items():
        rounds = report["rounds_by_model"].get(key)
        if not rounds:
            continue
        rates = ", ".join(f"{r['requests_per_s']:.2f}" for r in rounds)
        last = rounds[-1]
        # Guided mode's tags are the server's (and its question line sits before `<answer>`):
        # the model's format is only measured where the model writes the tags.
        formed = "(server-written)" if key == "guided" else f"{last['well_formed']}/{last['requests']}"
        lines.append(
            f"| `{name}` | {mode} | {rates} | {last['prompt_tokens_mean']:.0f} | {last['completion_tokens_mean']:.0f} | "
            f"{formed} | {last['external_calls']} |"
        )
    prompt = report["prompt_token_ratio"]
    ratios = "; ".join(
        f"{MODELS[key][2]} / guided **{value:.2f}x**" for key, value in report["throughput_ratios"].items()
    )
    lines += [
        "",
        f"Requests per second against guided mode (mean of rounds): {ratios}. Prompt tokens per "
        f"answer, native / guided: **{prompt:.2f}**.",
        "",
        machine_markdown(report["machine"]),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.native_model", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--merged-url", default=None, help="a server run with --model smollm2-135m-ssrl (merged weights)"
    )
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
    urls = {"base": args.base_url, "merged": args.merged_url}
    keys = [k for k, (_, server, _) in MODELS.items() if urls[server]]
    by_model: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for round_index in range(args.rounds):
        order = keys if round_index % 2 == 0 else list(reversed(keys))
        for key in order:
            model, server, _ = MODELS[key]
            result = asyncio.run(
                run_model(
                    str(urls[server]).rstrip("/").removesuffix("/v1"),
                    headers,
                    model,
                    questions,
                    args.concurrency,
                    args.policy,
                )
            )
            print(key, json.dumps(result))
            by_model[key].append(result)

    def mean_of(key: str, field: str) -> float:
        return float(statistics.mean(r[field] for r in by_model[key]))

    report = {
        "command": "python -m bench.native_model "
        + (f"--merged-url {args.merged_url} " if args.merged_url else "")
        + f"--rounds {args.rounds}",
        "questions": len(questions),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "policy": args.policy,
        "rounds_by_model": by_model,
        "throughput_ratios": {
            key: mean_of(key, "requests_per_s") / mean_of("guided", "requests_per_s")
            for key in keys
            if key != "guided"
        },
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
