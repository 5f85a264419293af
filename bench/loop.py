"""What the self-search loop costs on top of plain generation, and what logprobs cost.

Runs the real default model in process (no HTTP: the loop's own overhead is measured):

1. Loop overhead: for each question, one trajectory whose searches are all filled by the model
   (policy `never`, guided mode), against one single-pass generation of exactly the same
   number of tokens from the same prompt (`ignore_eos`). Interleaved per question; the ratio
   of total wall times is the loop's overhead (target <= 1.05x, issue 18). Prefix caching is on.
2. Logprobs cost: concurrency 8, 64 tokens each, top-k logprobs at k = none, 0, 5, 20,
   interleaved rounds; output tokens/s and the ratio against no logprobs (target >= 0.90).

    .venv/bin/python -m bench.loop [--questions 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    machine_info,
    machine_markdown,
    replace_markdown_section,
)
from clients.files import atomic_write_json
from router.scoring import percentile

QA = ROOT.parent / "shared" / "data" / "qa" / "nq_open_dev.jsonl"
# A model-filled trajectory against one single pass of the same tokens (issue 18).
LOOP_OVERHEAD_TARGET = 1.05


def load_questions(n: int) -> list[str]:
    with open(QA, encoding="utf-8") as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f, strict=False)]


async def loop_overhead(engine: Any, questions: list[str]) -> dict[str, Any]:
    from router.engine.base import SamplingOptions
    from router.loop import LoopConfig, LoopFinished, SelfSearchLoop
    from router.policies import NeverPolicy
    from router.prompts import GUIDED, example_messages
    from router.search.service import SearchService

    config = LoopConfig(mode="guided", policy=NeverPolicy(), temperature=0.0)
    rows = []
    for i, question in enumerate(questions):
        messages = [
            {"role": "system", "content": GUIDED},
            *example_messages("guided"),
            {"role": "user", "content": question},
        ]
        prompt = engine.apply_chat_template(messages)
        started = time.perf_counter()
        result = None
        async for event in SelfSearchLoop(engine, SearchService([]), config, prompt, f"loop-{i}").run():
            if isinstance(event, LoopFinished):
                result = event.result
        loop_s = time.perf_counter() - started
        tokens = result.completion_tokens
        options = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        started = time.perf_counter()
        generated = 0
        async for delta in engine.generate(prompt, options, f"single-{i}"):
            generated += len(delta.token_ids)
        single_s = time.perf_counter() - started
        rows.append(
            {
                "question": question,
                "tokens": tokens,
                "single_tokens": generated,
                "loop_s": loop_s,
                "single_s": single_s,
            }
        )
    loop_total = sum(r["loop_s"] for r in rows)
    single_total = sum(r["single_s"] for r in rows)
    return {
        "questions": len(rows),
        "tokens": sum(r["tokens"] for r in rows),
        "loop_s": loop_total,
        "single_s": single_total,
        "ratio": loop_total / single_total,
        "per_question_ratio_p50": percentile([r["loop_s"] / r["single_s"] for r in rows], 50),
        "rows": rows,
    }


async def logprobs_cost(engine: Any, questions: list[str], rounds: int) -> dict[str, Any]:
    from router.engine.base import SamplingOptions

    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in questions[:8]]
    settings: list[int | None] = [None, 0, 5, 20]
    samples: dict[str, list[float]] = {str(k): [] for k in settings}

    async def one(prompt: list[int], k: int | None, tag: str) -> int:
        options = SamplingOptions(max_tokens=64, temperature=0.0, ignore_eos=True, logprobs=k)
        count = 0
        async for delta in engine.generate(prompt, options, tag):
            count += len(delta.token_ids)
        return count

    for r in range(rounds):
        for k in settings:
            started = time.perf_counter()
            counts = await asyncio.gather(*(one(p, k, f"lp-{r}-{k}-{i}") for i, p in enumerate(prompts)))
            samples[str(k)].append(sum(counts) / (time.perf_counter() - started))
    base = sum(samples["None"]) / len(samples["None"])
    return {
        "concurrency": len(prompts),
        "max_tokens": 64,
        "rounds": rounds,
        "tokens_per_s": {k: sum(v) / len(v) for k, v in samples.items()},
        "ratio_vs_none": {k: (sum(v) / len(v)) / base for k, v in samples.items()},
    }


def markdown(result: dict[str, Any], command: str) -> str:
    lo = result["loop_overhead"]
    lp = result["logprobs"]
    ok = "✓" if lo["ratio"] <= LOOP_OVERHEAD_TARGET else "✗"
    lines = [
        "## Self-search loop: overhead and the cost of logprobs",
        "",
        machine_markdown(result["machine"]),
        f"Command: `{command}` (in-process engine, `--enforce-eager`, prefix caching on).",
        "",
        "### Loop with every search filled by the model vs one single pass",
        "",
        f"{lo['questions']} NQ-open questions, guided mode, policy `never`, temperature 0: each "
        "trajectory is three engine calls (query, information, answer) with server-inserted tags "
        "between them; the single pass generates the same number of tokens from the same prompt.",
        "",
        "| questions | tokens | loop wall (s) | single pass wall (s) | ratio | p50 per question | target |",
        "|---|---|---|---|---|---|---|",
        f"| {lo['questions']} | {lo['tokens']} | {lo['loop_s']:.2f} | {lo['single_s']:.2f} | "
        f"{lo['ratio']:.3f} | {lo['per_question_ratio_p50']:.3f} | <= {LOOP_OVERHEAD_TARGET} {ok} |",
        "",
        "### Top-k logprobs at concurrency 8 (64 tokens each)",
        "",
        "| logprobs k | output tokens/s | ratio vs none |",
        "|---|---|---|",
    ]
    for k, tps in lp["tokens_per_s"].items():
        label = "none" if k == "None" else k
        lines.append(f"| {label} | {tps:.1f} | {lp['ratio_vs_none'][k]:.3f} |")
    lines.append("")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from router.engine.default_model import ensure_default_checkpoint
    from router.engine.vllm_engine import EngineConfig, VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model = args.model or str(ensure_default_checkpoint())
    engine = VLLMEngine.start(
        EngineConfig(
            model=model,
            served_model_name="bench",
            max_model_len=2048,
            enforce_eager=True,
            enable_prefix_caching=True,
        )
    )
    try:
        questions = load_questions(args.questions)
        # Warm-up: the first requests of a fresh engine pay for one-off initialisation.
        await loop_overhead(engine, questions[:2])
        overhead = await loop_overhead(engine, questions)
        logprobs = await logprobs_cost(engine, questions, args.rounds)
    finally:
        await engine.shutdown()
    return {"machine": machine_info(), "loop_overhead": overhead, "logprobs": logprobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loop.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    atomic_write_json(args.out, result)
    command = f"python -m bench.loop --questions {args.questions} --rounds {args.rounds}"
    replace_markdown_section(args.markdown, "loop", markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
