"""Native against guided on the same questions, from `ssrl eval --sweep` runs:
`python -m bench.native_report RUNS_DIR`.

RUNS_DIR holds one sweep per (model, set): ``{native,guided}-{dev,first}/`` (each made by
``ssrl eval --sweep --model M --data D --out RUNS_DIR/<model>-<set>`` against one server). A
sweep's branched run answers every question self-filled *and*, from the identical prefix, with
the search's documents inserted (exact counterfactuals), so one run gives, per question, the
outcome under ``never``, under ``always`` and under any threshold on the first query's entropy.

Per model and set: well-formed trajectories (native: the model's own transcript has a one-line
query, a closed information block and a closed answer), exact match under never / always /
the threshold policy (95 % bootstrap intervals), prompt tokens per answer, the AUROC of the
``max`` aggregate for "the self-filled answer was wrong" with its class counts, and, for the
native model, the threshold re-derived for it: the smallest tau whose counterfactual accuracy is
within the interval of always-search's at the lowest call rate.
Writes ``RUNS_DIR/summary.json`` and the "Native model" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import machine_info, machine_markdown, replace_markdown_section
from router.scoring import auroc, best_exact_match, bootstrap_mean
from train.render import well_formed

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
GUIDED_TAU = 4.85  # the server's default threshold (max aggregate), derived for guided mode
SETS = {"first": "first-impression", "dev": "dev set"}


def _rows(run: Path) -> list[dict[str, Any]]:
    path = run / "branched" / "results.jsonl"
    chosen: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("error") is None:
                chosen[str(row["id"])] = row
    return list(chosen.values())


def outcomes(row: dict[str, Any]) -> dict[str, Any]:
    """One question's self-filled and searched outcomes and its first query's max entropy."""
    branches = (row.get("trace") or {}).get("counterfactuals") or []
    first = branches[0] if branches else None
    searched = bool(first and not first.get("error"))
    always = (
        best_exact_match(str(first.get("answer") or ""), row["gold"]) if searched else bool(row["correct"])
    )
    entropy = (row.get("entropy") or {}).get("max")
    return {
        "never": bool(row["correct"]),
        "always": bool(always),
        "entropy": entropy,
        "well_formed": well_formed(row.get("reasoning") or ""),
        "prompt_tokens": int((row.get("usage") or {}).get("prompt_tokens") or 0),
    }


def routed(items: Sequence[dict[str, Any]], tau: float) -> list[bool]:
    """Each question's outcome under a threshold policy on the max entropy."""
    return [o["always"] if o["entropy"] is not None and o["entropy"] > tau else o["never"] for o in items]


def _interval(values: Sequence[bool]) -> list[float]:
    found = bootstrap_mean([float(v) for v in values])
    return [round(found.low, 3), round(found.high, 3)] if found else [0.0, 0.0]


def derive_tau(items: Sequence[dict[str, Any]]) -> float | None:
    """The largest threshold (fewest calls) whose counterfactual accuracy reaches the lower end
    of always-search's 95 % interval; None if no threshold does."""
    always_low = _interval([o["always"] for o in items])[0]
    entropies = sorted({o["entropy"] for o in items if o["entropy"] is not None}, reverse=True)
    for tau in entropies:
        if sum(routed(items, tau)) / len(items) >= always_low:
            return round(tau, 3)
    return None


def summarize(items: Sequence[dict[str, Any]], tau: float) -> dict[str, Any]:
    n = len(items)
    calls = sum(1 for o in items if o["entropy"] is not None and o["entropy"] > tau)
    wrong = [not o["never"] for o in items if o["entropy"] is not None]
    scores = [o["entropy"] for o in items if o["entropy"] is not None]
    value = auroc(scores, wrong)
    out: dict[str, Any] = {"n": n, "tau": tau, "call_rate": round(calls / n, 3) if n else 0.0}
    for name, values in (
        ("never", [o["never"] for o in items]),
        ("always", [o["always"] for o in items]),
        ("threshold", routed(items, tau)),
    ):
        out[name] = {"em": round(sum(values) / n, 3), "ci": _interval(values)}
    out["well_formed"] = sum(o["well_formed"] for o in items)
    out["prompt_tokens_mean"] = round(sum(o["prompt_tokens"] for o in items) / n, 1)
    out["auroc_max"] = round(value, 3) if value is not None else None
    out["auroc_counts"] = {"wrong": sum(wrong), "right": len(wrong) - sum(wrong)}
    return out


def _cell(part: dict[str, Any]) -> str:
    return f"{part['em']:.3f} [{part['ci'][0]:.3f}, {part['ci'][1]:.3f}]"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "## Native model: native against guided on the same questions",
        "",
        "Written by `bench/native_report.py` (docs/native-model.md says how the model was made). "
        f"Runs: `{summary['runs']}` (`ssrl eval --sweep`, one server serving both models, "
        "temperature 0); made into this table by `python -m bench.native_report`. Exact match "
        "with 95 % bootstrap intervals; the threshold policy is `max` entropy > tau, computed "
        "from each question's exact counterfactual pair (never / always from the identical prefix).",
        "",
        "| set | model | well formed | never | always | threshold (tau, call rate) "
        "| prompt tokens / answer | AUROC max (wrong / right) |",
        "|---|---|---:|---|---|---|---:|---|",
    ]
    for key, label in SETS.items():
        for model in ("guided", "native"):
            s = summary["results"].get(f"{model}-{key}")
            if s is None:
                continue
            wf = f"{s['well_formed']}/{s['n']}" if model == "native" else "(server-written)"
            lines.append(
                f"| {label} ({s['n']}) | {model} | {wf} | {_cell(s['never'])} | {_cell(s['always'])} | "
                f"{_cell(s['threshold'])} (tau {s['tau']}, {s['call_rate']:.2f}) | {s['prompt_tokens_mean']:.0f} | "
                f"{s['auroc_max']} ({s['auroc_counts']['wrong']} / {s['auroc_counts']['right']}) |"
            )
    if summary.get("native_tau") is not None:
        lines += [
            "",
            f"Threshold re-derived for the native model on the dev set: **tau = {summary['native_tau']}**.",
        ]
    lines += ["", machine_markdown(summary["machine"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.native_report", description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument(
        "--native-tau", type=float, default=None, help="threshold of the native model (default: derived)"
    )
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    loaded = {
        f"{m}-{s}": [outcomes(r) for r in _rows(args.runs / f"{m}-{s}")]
        for m in ("guided", "native")
        for s in SETS
        if (args.runs / f"{m}-{s}" / "branched" / "results.jsonl").is_file()
    }
    native_tau = args.native_tau
    if native_tau is None and "native-dev" in loaded:
        native_tau = derive_tau(loaded["native-dev"])
    results = {
        key: summarize(items, GUIDED_TAU if key.startswith("guided") else (native_tau or GUIDED_TAU))
        for key, items in loaded.items()
    }
    summary = {
        "runs": str(runs.relative_to(ROOT) if (runs := args.runs.resolve()).is_relative_to(ROOT) else runs),
        "native_tau": native_tau,
        "results": results,
        "machine": machine_info(),
    }
    (args.runs / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    if not args.no_docs:
        replace_markdown_section(DOCS, "native-model-quality", text)
    print(text, file=sys.stdout)


if __name__ == "__main__":
    main()
