"""First impression: does the default answer beat the bare model on common questions?

Runs the real default model in process (vLLM, `--enforce-eager`) over the first-impression
set (`tests/data/first_impression.jsonl`: ~100 common-knowledge questions, each with its
acceptable answers and the title of the default-index article that holds the answer), at
temperature 0, under these conditions:

- `off`: self-search off, a plain chat completion (the model's default system prompt),
  `--off-max-tokens` tokens;
- `direct`: the guided prompt and examples, the answer turn written at once (no search);
- `never`: guided, every information block filled by the model (policy `never`);
- `always`: guided, every query sent to the default local Wikipedia index (policy `always`);
- `default`: guided, the server's default policy (`threshold`, tau and aggregate from
  `ServeSettings`), the default local index.

Reports per condition: exact match (SQuAD normalisation, best over the gold answers),
answer-in-response (a normalised gold answer inside the normalised response), degenerate
repetition rate, mean response length, and for searching conditions the share of
trajectories whose inserted documents held the gold article.

    .venv/bin/python -m bench.first_impression [--limit N] [--conditions off,always,...]
        [--out bench/results/first_impression.json] [--markdown docs/evaluation.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info
from clients.files import atomic_write_json
from router.scoring import best_exact_match, normalize_answer

DATA = ROOT / "tests" / "data" / "first_impression.jsonl"
CONDITIONS = ("off", "direct", "never", "always", "default")
SEARCHING = ("always", "default")


def load_set(path: Path = DATA, limit: int | None = None) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def answer_in_response(response: str, golds: list[str]) -> bool:
    """A normalised gold answer appears, on word boundaries, inside the normalised response."""
    text = f" {normalize_answer(response)} "
    return any(f" {normalize_answer(g)} " in text for g in golds if normalize_answer(g))


_WORD = re.compile(r"\w+")


def is_repetitive(response: str) -> bool:
    """Degenerate repetition: a word n-gram (n = 1..4) said three or more times over, or
    one token making up over half of a response of six words or more."""
    words = [w.lower() for w in _WORD.findall(response)]
    for n in range(1, 5):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        for i in range(len(grams)):
            # Three back-to-back copies of the same n-gram: "1609 1609 1609", "a b a b a b".
            if i + 2 * n < len(grams) and grams[i] == grams[i + n] == grams[i + 2 * n]:
                return True
    if len(words) >= 6:
        top = max(words.count(w) for w in set(words))
        if top / len(words) > 0.5:
            return True
    return False


def score(rows: list[dict[str, Any]], responses: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    em = sum(best_exact_match(r["response"], q["answers"]) for q, r in zip(rows, responses, strict=True))
    inside = sum(
        answer_in_response(r["response"], q["answers"]) for q, r in zip(rows, responses, strict=True)
    )
    repeats = sum(is_repetitive(r["response"]) for r in responses)
    summary: dict[str, Any] = {
        "questions": n,
        "exact_match": em,
        "answer_in_response": inside,
        "repetitive": repeats,
        "empty": sum(1 for r in responses if not r["response"].strip()),
        "mean_chars": round(sum(len(r["response"]) for r in responses) / max(n, 1), 1),
    }
    if any("external_calls" in r for r in responses):
        summary["external_calls"] = sum(r.get("external_calls", 0) for r in responses)
        summary["gold_article_inserted"] = sum(
            1 for q, r in zip(rows, responses, strict=True) if q["title"] in r.get("titles", [])
        )
    return summary


async def run_off(engine: Any, rows: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    from router.engine.base import SamplingOptions

    async def one(i: int, row: dict[str, Any]) -> dict[str, Any]:
        prompt = engine.apply_chat_template([{"role": "user", "content": row["question"]}])
        options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, seed=0)
        text = ""
        async for delta in engine.generate(prompt, options, f"fi-off-{i}"):
            text += delta.text
        return {"response": text.strip()}

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(rows))))


async def run_loop(
    engine: Any, search: Any, rows: list[dict[str, Any]], condition: str, **overrides: Any
) -> list[dict[str, Any]]:
    from router.loop import LoopConfig, LoopFinished, SelfSearchLoop
    from router.policies import make_policy
    from router.prompts import GUIDED_DOCS_PER_SEARCH, GUIDED_MAX_DOC_CHARS, example_messages, system_prompt
    from server.settings import ServeSettings

    settings = ServeSettings()
    name = "never" if condition in ("never", "direct") else condition
    if condition == "default":
        policy = make_policy(
            settings.search_policy,
            tau=settings.search_threshold,
            aggregate=settings.search_aggregate,
            budget=settings.search_budget,
        )
    else:
        policy = make_policy(
            name, tau=settings.search_threshold, aggregate=settings.search_aggregate, budget=None
        )
    # What the server gives a guided request by default (server/serving_self_search.py).
    config = LoopConfig(
        mode="guided",
        policy=policy,
        temperature=0.0,
        seed=0,
        docs_per_search=GUIDED_DOCS_PER_SEARCH,
        max_doc_chars=GUIDED_MAX_DOC_CHARS,
    )
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if condition == "direct":
        config = replace(config, guided_searches=0)

    async def one(i: int, row: dict[str, Any]) -> dict[str, Any]:
        messages = [
            {"role": "system", "content": system_prompt("guided")},
            *example_messages("guided"),
            {"role": "user", "content": row["question"]},
        ]
        prompt = engine.apply_chat_template(messages)
        loop = SelfSearchLoop(engine, search, config, prompt, f"fi-{condition}-{i}")
        async for event in loop.run():
            if isinstance(event, LoopFinished):
                result = event.result
                return {
                    "response": result.answer,
                    "queries": [s.query for s in result.searches],
                    "decisions": [s.route for s in result.searches],
                    "titles": [d.title for s in result.searches for d in s.documents],
                    "information": [s.information[:300] for s in result.searches],
                    "external_calls": result.external_calls,
                    "transcript": result.transcript,
                }
        raise RuntimeError("the loop ended without a result")

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(rows))))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| condition | exact match | answer in response | repetitive | empty | mean chars | "
        "external calls | gold article inserted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["conditions"].items():
        n = s["questions"]
        lines.append(
            f"| {name} | {s['exact_match']}/{n} | {s['answer_in_response']}/{n} | {s['repetitive']} | "
            f"{s['empty']} | {s['mean_chars']} | {s.get('external_calls', '—')} | "
            f"{s.get('gold_article_inserted', '—')} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from router.engine.default_model import default_cache_dir, ensure_default_checkpoint
    from router.engine.vllm_engine import EngineConfig, VLLMEngine
    from router.search.default_corpus import ensure_default_index
    from router.search.local_index import LocalIndexBackend
    from router.search.service import SearchService

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    rows = load_set(Path(args.data), args.limit)
    search = SearchService.from_backends([LocalIndexBackend(ensure_default_index(default_cache_dir()))])
    engine = VLLMEngine.start(
        EngineConfig(
            model=args.model or str(ensure_default_checkpoint()),
            served_model_name="bench",
            max_model_len=2048,
            enforce_eager=True,
            enable_prefix_caching=True,
        )
    )
    report: dict[str, Any] = {"machine": machine_info(), "questions": len(rows), "conditions": {}, "rows": {}}
    try:
        await run_off(engine, rows[:2], 4)  # warm-up
        for condition in args.conditions.split(","):
            started = time.perf_counter()
            if condition == "off":
                responses = await run_off(engine, rows, args.off_max_tokens)
            else:
                responses = await run_loop(
                    engine,
                    search,
                    rows,
                    condition,
                    docs_per_search=args.docs_per_search,
                    max_doc_chars=args.max_doc_chars,
                )
            summary = score(rows, responses)
            summary["wall_s"] = round(time.perf_counter() - started, 1)
            report["conditions"][condition] = summary
            report["rows"][condition] = [
                {"id": q["id"], "question": q["question"], "answers": q["answers"], **r}
                for q, r in zip(rows, responses, strict=True)
            ]
            print(condition, json.dumps(summary), flush=True)
    finally:
        await engine.shutdown()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--off-max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    parser.add_argument("--docs-per-search", type=int, default=None, help="default: the loop's")
    parser.add_argument("--max-doc-chars", type=int, default=None, help="default: the loop's")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "first_impression.json"))
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    atomic_write_json(Path(args.out), report)
    print(markdown(report))


if __name__ == "__main__":
    main()
