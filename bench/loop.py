"""What the self-search loop costs on top of plain generation, and what logprobs cost.

Runs the real default model in process (no HTTP: the loop's own overhead is measured):

1. Loop overhead: for each question, one trajectory whose searches are all filled by the model
   (policy `never`, guided mode, the server's defaults), against single-pass generations from
   the same prompt (`ignore_eos`): of exactly the tokens the model generated in the loop, and
   of the whole trajectory (those plus the tokens the loop inserted). Interleaved per
   question; the ratio of total wall times is the loop's overhead (target <= 1.05x, issue 18).
   Prefix caching is on.
2. Logprobs cost: concurrency 8, 64 tokens each, top-k logprobs at k = none, 0, 5, 20,
   interleaved rounds; output tokens/s and the ratio against no logprobs (target >= 0.90).

3. With ``--native``: the loop overhead alone, in native mode on the native model (the
   shipped adapter merged, `ssrl serve --model smollm2-135m-ssrl`'s weights) with its prompt:
   one engine request per trajectory (the single pass: the loop reads the stream, decides at
   `</search>` on the logprobs in it, and reads on), against single passes of the same tokens
   (target <= 1.02x, issue 34). Writes its own section.

    .venv/bin/python -m bench.loop [--questions 16] [--rounds 3] [--native]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    machine_info,
    machine_markdown,
    number,
    replace_markdown_section,
)
from clients.files import atomic_write_json
from router.scoring import percentile

QA = ROOT.parent / "shared" / "data" / "qa" / "nq_open_dev.jsonl"
# A model-filled trajectory against one single pass of the same tokens (issue 18).
LOOP_OVERHEAD_TARGET = 1.05
# The same in native mode, one request per trajectory (issue 34).
NATIVE_OVERHEAD_TARGET = 1.02


def load_questions(n: int) -> list[str]:
    with open(QA, encoding="utf-8") as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f, strict=False)]


async def _overhead_row(engine: Any, i: int, question: str, native: bool = False) -> dict[str, Any]:
    """One question's three timed runs: the loop, then (in turns) the two single passes."""
    from router.engine.base import SamplingOptions
    from router.loop import LoopConfig, LoopFinished, SelfSearchLoop
    from router.policies import NeverPolicy
    from router.prompts import GUIDED, NATIVE_COMPACT, example_messages
    from router.search.service import SearchService

    if native:
        # The native model's own prompt (no examples), the server's native defaults.
        config = LoopConfig(mode="native", policy=NeverPolicy(), temperature=0.0, max_tokens=256)
        messages = [{"role": "system", "content": NATIVE_COMPACT}, {"role": "user", "content": question}]
    else:
        # The server's guided defaults, the question line before <answer> included.
        config = LoopConfig(mode="guided", policy=NeverPolicy(), temperature=0.0, question=question)
        messages = [
            {"role": "system", "content": GUIDED},
            *example_messages("guided"),
            {"role": "user", "content": question},
        ]
    prompt = engine.apply_chat_template(messages)
    row: dict[str, Any] = {"question": question}

    async def run_loop() -> None:
        loop = SelfSearchLoop(engine, SearchService([]), config, prompt, f"loop-{i}")
        result = None
        async for event in loop.run():
            if isinstance(event, LoopFinished):
                result = event.result
        assert result is not None
        row["tokens"] = result.completion_tokens
        row["engine_requests"] = result.engine_requests
        row["inserted_tokens"] = len(loop.ids) - len(prompt) - result.completion_tokens

    async def single(key: str, tokens: int) -> None:
        options = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        generated = 0
        async for delta in engine.generate(prompt, options, f"{key}-{i}"):
            generated += len(delta.token_ids)
        row[f"{key}_tokens"] = generated

    async def timed(key: str, run: Callable[[], Awaitable[None]]) -> None:
        started = time.perf_counter()
        await run()
        row[f"{key}_s"] = time.perf_counter() - started

    # A one-token call first caches the prompt's full KV blocks, so that all three timed runs
    # find the question cached alike (else the runs after the first would).
    await single("warm", 1)
    await timed("loop", run_loop)
    passes: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("single", lambda: single("single", row["tokens"])),
        ("single_transcript", lambda: single("single_transcript", row["tokens"] + row["inserted_tokens"])),
    ]
    for key, run in passes if i % 2 == 0 else passes[::-1]:
        await timed(key, run)
    return row


async def loop_overhead(engine: Any, questions: list[str], native: bool = False) -> dict[str, Any]:
    """Per question, three timed runs: the loop, and two single passes from the same prompt,
    one of the tokens the model generated in the loop, one of the whole trajectory (generated
    plus the tags and the question line the loop inserted, which a model writing the
    trajectory alone would have generated too)."""
    rows = [await _overhead_row(engine, i, question, native) for i, question in enumerate(questions)]
    loop_total = sum(r["loop_s"] for r in rows)
    single_total = sum(r["single_s"] for r in rows)
    transcript_total = sum(r["single_transcript_s"] for r in rows)
    return {
        "questions": len(rows),
        "tokens": sum(r["tokens"] for r in rows),
        "single_tokens": sum(r["single_tokens"] for r in rows),
        "inserted_tokens": sum(r["inserted_tokens"] for r in rows),
        "loop_s": loop_total,
        "single_s": single_total,
        "single_transcript_s": transcript_total,
        "ratio": loop_total / single_total,
        "ratio_transcript": loop_total / transcript_total,
        "per_question_ratio_p50": percentile([r["loop_s"] / r["single_s"] for r in rows], 50),
        "engine_requests": sum(r["engine_requests"] for r in rows),
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
    transcript_ratio = lo.get("ratio_transcript")
    ok2 = "" if transcript_ratio is None else ("✓" if transcript_ratio <= LOOP_OVERHEAD_TARGET else "✗")
    lines = [
        "## Self-search loop: overhead and the cost of logprobs",
        "",
        machine_markdown(result["machine"]),
        f"Command: `{command}` (in-process engine, `--enforce-eager`, prefix caching on).",
        "",
        "### Loop with every search filled by the model vs one single pass",
        "",
        f"{lo['questions']} NQ-open questions, guided mode with the server's defaults (the "
        "question line before `<answer>` included), policy `never`, temperature 0: each trajectory "
        "is three engine calls (query, information, answer) with server-inserted tags between "
        "them. Two single passes from the same prompt (`ignore_eos`): one of the tokens the model "
        "generated in the loop, one of the whole trajectory (those plus the tokens the loop "
        "inserted: `<search>`, the closing and opening tags, the question line, which a model "
        "writing the trajectory alone would generate). Per question a one-token call first caches "
        "the prompt's full KV blocks for all three; the loop runs first (it sizes the single "
        "passes), the two single passes take turns.",
        "",
        "| questions | generated tokens (loop / single) | inserted tokens | loop wall (s) | "
        "single pass wall (s) | ratio | whole-trajectory pass wall (s) | ratio | target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {lo['questions']} | {lo['tokens']} / {lo.get('single_tokens', lo['tokens'])} | "
        f"{lo.get('inserted_tokens', '—')} | {lo['loop_s']:.2f} | {lo['single_s']:.2f} | "
        f"{lo['ratio']:.3f} {ok} | {number(lo.get('single_transcript_s'))} | {number(lo.get('ratio_transcript'), 3)} {ok2} | "
        f"<= {LOOP_OVERHEAD_TARGET} |",
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


def native_markdown(result: dict[str, Any], command: str) -> str:
    lo = result["loop_overhead"]
    ok = "✓" if lo["ratio"] <= NATIVE_OVERHEAD_TARGET else "✗"
    return "\n".join(
        [
            "## Native single pass: loop overhead on the native model",
            "",
            machine_markdown(result["machine"]),
            f"Command: `{command}` (in-process engine on the merged native model, `--enforce-eager`, "
            "prefix caching on).",
            "",
            f"{lo['questions']} NQ-open questions, native mode with the native model's prompt, policy "
            "`never`, temperature 0, top-20 logprobs on every token: the model writes its query, its "
            "own `<information>` and its answer while the loop reads one stream and decides at each "
            "`</search>`. Against one single pass of the same number of tokens from the same prompt "
            "(`ignore_eos`, no logprobs); the loop runs first (it sizes the passes), then the passes "
            "take turns.",
            "",
            "| questions | engine requests | generated tokens (loop / single) | loop wall (s) | "
            "single pass wall (s) | ratio | whole-trajectory pass wall (s) | ratio | target |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {lo['questions']} | {lo['engine_requests']} | {lo['tokens']} / {lo['single_tokens']} | "
            f"{lo['loop_s']:.2f} | {lo['single_s']:.2f} | {lo['ratio']:.3f} {ok} | "
            f"{number(lo.get('single_transcript_s'))} | {number(lo.get('ratio_transcript'), 3)} | "
            f"<= {NATIVE_OVERHEAD_TARGET} |",
            "",
        ]
    )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from router.engine.default_model import ensure_default_checkpoint
    from router.engine.vllm_engine import EngineConfig, VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.native:
        from router.engine.merge import ensure_native_checkpoint

        model = args.model or str(ensure_native_checkpoint())
    else:
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
        await loop_overhead(engine, questions[:2], args.native)
        overhead = await loop_overhead(engine, questions, args.native)
        if args.native:
            return {"machine": machine_info(), "loop_overhead": overhead}
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
    parser.add_argument("--native", action="store_true", help="native mode on the native model (issue 34)")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.native:
        out = args.out.with_name("loop-native.json") if args.out.name == "loop.json" else args.out
        atomic_write_json(out, result)
        command = f"python -m bench.loop --native --questions {args.questions}"
        replace_markdown_section(args.markdown, "loop-native", native_markdown(result, command))
        print(native_markdown(result, command))
        return
    atomic_write_json(args.out, result)
    command = f"python -m bench.loop --questions {args.questions} --rounds {args.rounds}"
    replace_markdown_section(args.markdown, "loop", markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
