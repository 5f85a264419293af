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
  `ServeSettings`), the default local index;
- `branched`: guided, policy `never` with exact counterfactuals (`LoopConfig.counterfactual`):
  each question's self-filled answer and the answer of the branch that searched from the
  identical prefix (same query, same entropy), scored as `branched:never` and
  `branched:always`, and the accuracy of every entropy threshold on them.

A `~tX` suffix samples the condition at temperature X (a seed per question) instead of
greedily: `off~t1.0,default~t1.0` is what a client that omits `temperature` got before the
served model's defaults (docs/benchmarks.md "First answer"). `--repeat fi-002x10:default`
asks one question ten times, each run with its own seed.

Guided conditions send the search backend the user's question after the model's query when
the server does by default (`ServeSettings.search_with_question`); a `+q` / `-q` suffix forces
it on / off (`always+q`, `branched-q`). An `@variant` suffix runs the condition with one of
`VARIANTS` (constants of `router.prompts` / `router.loop` patched for that condition only):
`branched@d300` against `branched` in the same run.

Reports per condition: exact match (SQuAD normalisation, best over the gold answers),
answer-in-response (a normalised gold answer inside the normalised response), degenerate
repetition rate, mean response length, and for searching conditions the share of
trajectories whose inserted documents held the gold article. With never and always outcomes
of the same questions (`branched`, else the `never` and `always` conditions) and the first
query's entropy aggregates, the accuracy each threshold would give ("Thresholds").

    .venv/bin/python -m bench.first_impression [--limit N] [--conditions off,always,...]
        [--out bench/results/first_impression.json] [--markdown docs/evaluation.md]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info
from clients.files import atomic_write_json
from router.scoring import best_exact_match, bootstrap_mean, is_repetitive, normalize_answer

DATA = ROOT / "tests" / "data" / "first_impression.jsonl"
CONDITIONS = ("off", "direct", "never", "always", "default")
SEARCHING = ("always", "default")
AGGREGATES = ("mean", "max", "min_prob", "ssrl")


def load_set(path: Path = DATA, limit: int | None = None) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def answer_in_response(response: str, golds: list[str]) -> bool:
    """A normalised gold answer appears, on word boundaries, inside the normalised response."""
    text = f" {normalize_answer(response)} "
    return any(f" {normalize_answer(g)} " in text for g in golds if normalize_answer(g))


def score(rows: list[dict[str, Any]], responses: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    em = sum(best_exact_match(r["response"], q["answers"]) for q, r in zip(rows, responses, strict=True))
    inside = sum(
        answer_in_response(r["response"], q["answers"]) for q, r in zip(rows, responses, strict=True)
    )
    repeats = sum(is_repetitive(r["response"]) for r in responses)
    inside_each = [
        float(answer_in_response(r["response"], q["answers"])) for q, r in zip(rows, responses, strict=True)
    ]
    interval = bootstrap_mean(inside_each)
    summary: dict[str, Any] = {
        "questions": n,
        "exact_match": em,
        "answer_in_response": inside,
        # Percentile-bootstrap 95 % interval of the answer-in-response count, over questions.
        "answer_in_response_95": [round(interval.low * n), round(interval.high * n)] if interval else None,
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


async def run_off(
    engine: Any, rows: list[dict[str, Any]], max_tokens: int, temperature: float = 0.0
) -> list[dict[str, Any]]:
    from router.engine.base import SamplingOptions

    async def one(i: int, row: dict[str, Any]) -> dict[str, Any]:
        prompt = engine.apply_chat_template([{"role": "user", "content": row["question"]}])
        # A seed per question: sampled runs are reproducible, and no two questions share draws.
        options = SamplingOptions(max_tokens=max_tokens, temperature=temperature, seed=i)
        text = ""
        async for delta in engine.generate(prompt, options, f"fi-off-{i}"):
            text += delta.text
        return {"response": text.strip()}

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(rows))))


# Experiments: name -> {(module, constant): value}, applied while one condition runs (the
# values the defaults were chosen against, docs/evaluation.md "First impression").
VARIANTS: dict[str, dict[tuple[str, str], Any]] = {
    "rp1.1": {("router.loop", "GUIDED_FILL_REPETITION_PENALTY"): 1.1},
    "fp0": {("router.loop", "GUIDED_ANSWER_FREQUENCY_PENALTY"): 0.0},
    "d100": {("router.prompts", "GUIDED_MAX_DOC_CHARS"): 100},
    "d300": {("router.prompts", "GUIDED_MAX_DOC_CHARS"): 300},
    "rq": {("router.prompts", "GUIDED_RESTATE_QUESTION"): True},
    "norq": {("router.prompts", "GUIDED_RESTATE_QUESTION"): False},
    "wordcut": {("router.tags", "CUT_AT_SENTENCE"): False},
    "s50": {("router.tags", "SENTENCE_SLACK"): 0.5},
    "k2": {("router.prompts", "GUIDED_DOCS_PER_SEARCH"): 2},
}


def split_variant(condition: str) -> tuple[str, dict[tuple[str, str], Any]]:
    """`always+q@rp1` -> ("always+q", the rp1 patches); unknown names raise."""
    name, _, variant = condition.partition("@")
    patches: dict[tuple[str, str], Any] = {}
    for v in filter(None, variant.split("@")):
        patches.update(VARIANTS[v])
    return name, patches


def split_temperature(condition: str) -> tuple[str, float]:
    """`default~t0.7` -> ("default", 0.7); without `~t`, temperature 0 (greedy)."""
    name, _, value = condition.partition("~t")
    return name, float(value) if value else 0.0


def split_condition(condition: str) -> tuple[str, bool | None]:
    """`always+q` -> ("always", True); `always-q` -> ("always", False); `always` -> (.., None)."""
    condition = condition.partition("~t")[0].partition("@")[0]
    for suffix, value in (("+q", True), ("-q", False)):
        if condition.endswith(suffix):
            return condition[: -len(suffix)], value
    return condition, None


def _search_row(result: Any) -> dict[str, Any]:
    return {
        "response": result.answer,
        "queries": [s.query for s in result.searches],
        "sent_queries": [s.sent_query for s in result.searches],
        "decisions": [s.route for s in result.searches],
        "entropy": (
            {a: getattr(result.searches[0].entropy, a) for a in AGGREGATES} if result.searches else None
        ),
        "titles": [d.title for s in result.searches for d in s.documents],
        "information": [s.information[:300] for s in result.searches],
        "external_calls": result.external_calls,
        "transcript": result.transcript,
    }


async def run_loop(
    engine: Any, search: Any, rows: list[dict[str, Any]], condition: str, **overrides: Any
) -> list[dict[str, Any]]:
    from router.loop import LoopConfig, LoopFinished, SelfSearchLoop
    from router.policies import make_policy
    from router.prompts import GUIDED_DOCS_PER_SEARCH, GUIDED_MAX_DOC_CHARS, example_messages, system_prompt
    from server.settings import ServeSettings

    settings = ServeSettings()
    condition, with_question = split_condition(condition)
    if with_question is None:
        with_question = settings.search_with_question
    name = "never" if condition in ("never", "direct", "branched") else condition
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
    if condition == "branched":
        config = replace(config, counterfactual=True, max_turns=1)

    async def one(i: int, row: dict[str, Any]) -> dict[str, Any]:
        messages = [
            {"role": "system", "content": system_prompt("guided")},
            *example_messages("guided"),
            {"role": "user", "content": row["question"]},
        ]
        prompt = engine.apply_chat_template(messages)
        row_config = replace(config, question=row["question"], seed=config.seed + i)
        if with_question:
            row_config = replace(row_config, search_context=row["question"])
        # The vocabulary size sizes the entropy estimate's unseen tail, as the server passes it.
        loop = SelfSearchLoop(
            engine,
            search,
            row_config,
            prompt,
            f"fi-{condition}-{i}",
            vocab_size=getattr(engine, "vocab_size", None),
        )
        async for event in loop.run():
            if isinstance(event, LoopFinished):
                out = _search_row(event.result)
                if condition == "branched":
                    # The branch that searched at the first search (absent: no search made,
                    # or the search failed; its outcome is then the trajectory's own).
                    branch = next((c for c in event.result.counterfactuals if c.at == 0), None)
                    out["branch"] = (
                        {
                            "response": branch.answer,
                            "titles": [d.title for d in branch.search.documents] if branch.search else [],
                            "sent_query": branch.search.sent_query if branch.search else None,
                            "external_calls": 1 if branch.search and branch.search.fallback is None else 0,
                            "transcript": branch.transcript,
                        }
                        if branch is not None
                        else None
                    )
                return out
        raise RuntimeError("the loop ended without a result")

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(rows))))


def paired_outcomes(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per question: the first query's aggregates and whether the self-filled (`never`) and
    the searched (`always`) answers were right; one set per `branched` condition (exact
    pairs), or else from the `never` and `always` conditions (the same greedy query up to
    vLLM's CPU noise)."""
    runs = report["rows"]
    sources: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = [
        (c, runs[c], [r["branch"] or r for r in runs[c]]) for c in runs if split_condition(c)[0] == "branched"
    ]
    if not sources:
        n_name = next((c for c in runs if split_condition(c)[0] == "never"), None)
        a_name = next((c for c in runs if split_condition(c)[0] == "always"), None)
        if n_name is not None and a_name is not None:
            sources.append((f"{n_name} + {a_name}", runs[n_name], runs[a_name]))
    paired = []
    for source, never, always in sources:
        out = []
        for q, n, a in zip(rows, never, always, strict=True):
            out.append(
                {
                    "entropy": n.get("entropy") or a.get("entropy"),
                    "never": (
                        best_exact_match(n["response"], q["answers"]),
                        answer_in_response(n["response"], q["answers"]),
                    ),
                    "always": (
                        best_exact_match(a["response"], q["answers"]),
                        answer_in_response(a["response"], q["answers"]),
                    ),
                }
            )
        paired.append({"source": source, "questions": out})
    return paired


def _routes_out(aggregate: str, value: float, tau: float) -> bool:
    """The server's comparison (`router.policies.exceeds`): min_prob below tau, else above."""
    return value < tau if aggregate == "min_prob" else value > tau


def threshold_table(paired: dict[str, Any], tau: float, aggregate: str) -> dict[str, Any]:
    """Accuracy (exact match, answer in response) and call rate of every cut of every aggregate,
    with the server's comparison (value > tau; min_prob: value < tau)."""
    qs = paired["questions"]
    n = len(qs)
    table: dict[str, Any] = {"source": paired["source"], "questions": n, "aggregates": {}}

    def point(agg: str, cut: float) -> dict[str, Any]:
        calls = em = inside = 0
        for q in qs:
            out = q["entropy"] is not None and _routes_out(agg, q["entropy"][agg], cut)
            calls += out
            em += q["always" if out else "never"][0]
            inside += q["always" if out else "never"][1]
        return {"tau": round(cut, 4), "calls": calls, "exact_match": em, "answer_in_response": inside}

    for agg in AGGREGATES:
        values = sorted({q["entropy"][agg] for q in qs if q["entropy"] is not None})
        if not values:
            continue
        # min_prob routes out BELOW tau, the entropies ABOVE it: both ends cover all or none.
        cuts = [values[0] - 1e-6] + [(a + b) / 2 for a, b in itertools.pairwise(values)] + [values[-1] + 1e-6]
        points = [point(agg, c) for c in cuts]
        table["aggregates"][agg] = {
            "best_exact_match": max(points, key=lambda p: (p["exact_match"], p["answer_in_response"])),
            "best_answer_in_response": max(points, key=lambda p: (p["answer_in_response"], p["exact_match"])),
            "points": points,
        }
    table["server_default"] = {"aggregate": aggregate, **point(aggregate, tau)}
    return table


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| condition | exact match | answer in response [95 %] | repetitive | empty | mean chars | "
        "external calls | gold article inserted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["conditions"].items():
        n = s["questions"]
        ci = s.get("answer_in_response_95")
        within = f" [{ci[0]}, {ci[1]}]" if ci else ""
        lines.append(
            f"| {name} | {s['exact_match']}/{n} | {s['answer_in_response']}/{n}{within} | {s['repetitive']} | "
            f"{s['empty']} | {s['mean_chars']} | {s.get('external_calls', '—')} | "
            f"{s.get('gold_article_inserted', '—')} |"
        )
    for table in report.get("thresholds", []):
        n = table["questions"]
        d = table["server_default"]
        lines += [
            "",
            f"Thresholds (never/always outcomes from {table['source']}, N={n}): server default "
            f"{d['aggregate']} tau {d['tau']}: {d['calls']} calls, {d['exact_match']}/{n} exact, "
            f"{d['answer_in_response']}/{n} in response",
            "",
            "| aggregate | best cut for exact match (tau: calls, EM, in response) | "
            "best cut for answer in response |",
            "|---|---|---|",
        ]
        for agg, a in table["aggregates"].items():
            e, r = a["best_exact_match"], a["best_answer_in_response"]
            lines.append(
                f"| {agg} | {e['tau']}: {e['calls']}, {e['exact_match']}, {e['answer_in_response']} | "
                f"{r['tau']}: {r['calls']}, {r['exact_match']}, {r['answer_in_response']} |"
            )
    return "\n".join(lines)


async def repeat_question(engine: Any, search: Any, rows: list[dict[str, Any]], spec: str) -> dict[str, Any]:
    """`fi-002x10:default~t0.7`: one question asked N times under one condition, each run with
    its own seed (what N newcomers asking the same first question would get)."""
    head, _, condition = spec.partition(":")
    question_id, _, times = head.partition("x")
    row = next(r for r in rows if r["id"] == question_id)
    named, temperature = split_temperature(condition or "default")
    answers = []
    for k in range(int(times or 10)):
        # Each run is the only question of its batch, seeded apart from the others.
        (out,) = await run_loop(engine, search, [row], named, temperature=temperature, seed=1000 + k)
        answers.append(out["response"])
    right = sum(answer_in_response(a, row["answers"]) for a in answers)
    return {
        "question": row["question"],
        "condition": condition,
        "answers": answers,
        "right": f"{right}/{len(answers)}",
    }


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
            named, temperature = split_temperature(condition)
            base, patches = split_variant(named)
            saved = {key: getattr(importlib.import_module(key[0]), key[1]) for key in patches}
            for (module, name), value in patches.items():
                setattr(importlib.import_module(module), name, value)
            try:
                if base == "off":
                    responses = await run_off(engine, rows, args.off_max_tokens, temperature)
                else:
                    responses = await run_loop(
                        engine,
                        search,
                        rows,
                        base,
                        docs_per_search=args.docs_per_search,
                        max_doc_chars=args.max_doc_chars,
                        temperature=temperature,
                    )
            finally:
                for (module, name), value in saved.items():
                    setattr(importlib.import_module(module), name, value)
            wall_s = round(time.perf_counter() - started, 1)
            report["rows"][condition] = [
                {"id": q["id"], "question": q["question"], "answers": q["answers"], **r}
                for q, r in zip(rows, responses, strict=True)
            ]
            scored = {condition: responses}
            if split_condition(condition)[0] == "branched":
                scored = {
                    f"{condition}:never": responses,
                    f"{condition}:always": [r["branch"] or r for r in responses],
                }
            for name, outcome in scored.items():
                summary = score(rows, outcome)
                summary["wall_s"] = wall_s
                report["conditions"][name] = summary
                print(name, json.dumps(summary), flush=True)
            atomic_write_json(Path(args.out), report)  # a crash later keeps what ran
        for spec in filter(None, (args.repeat or "").split(",")):
            report.setdefault("repeats", {})[spec] = await repeat_question(engine, search, rows, spec)
            print(spec, json.dumps(report["repeats"][spec]["right"]), flush=True)
            atomic_write_json(Path(args.out), report)
    finally:
        await engine.shutdown()
    from server.settings import ServeSettings

    settings = ServeSettings()
    report["thresholds"] = [
        threshold_table(p, settings.search_threshold, settings.search_aggregate)
        for p in paired_outcomes(report, rows)
    ]
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
    parser.add_argument(
        "--repeat",
        default=None,
        help="ID xN:CONDITION[,...]: ask one question N times, e.g. fi-002x10:default~t0.7",
    )
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    atomic_write_json(Path(args.out), report)
    print(markdown(report))


if __name__ == "__main__":
    main()
