"""`ssrl eval` and `ssrl calibrate` end to end: the real default model and local index behind
the session server, a few NQ-open questions, one search per trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.cli import main
from clients.eval_cli import EXIT_NO_SIGNAL
from tests.conftest import REPO_ROOT


def qa_file(name: str = "nq_open_dev.jsonl") -> Path:
    for base in (REPO_ROOT.parent / "shared" / "data" / "qa", Path("/work/shared/data/qa")):
        if (base / name).is_file():
            return base / name
    pytest.skip(f"QA set {name} not found under ../shared/data/qa")


def eval_args(server, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--data",
        str(qa_file()),
        "--out",
        str(out),
        "--base-url",
        server.base_url,
        "--api-key",
        server.api_key,
        "--max-turns",
        "1",
        "--no-progress",
        "--no-plots",
        "--concurrency",
        "4",
        "--timeout",
        "300",
        *extra,
    ]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def test_sweep_never_and_always_then_calibrate(server, tmp_path):
    out = tmp_path / "sweep"
    assert main(eval_args(server, out, "--sweep", "--limit", "4")) == 0

    for policy, rate in (("never", 0.0), ("always", 1.0)):
        summary = json.loads((out / policy / "summary.json").read_text())
        assert summary["errors"] == 0 and summary["scored"] == 4, summary["error_examples"]
        assert 0.0 <= summary["em"] <= 1.0 and 0.0 <= summary["f1"] <= 1.0
        assert summary["f1"] >= summary["em"]
        assert summary["external_call_rate"] == rate
        assert summary["searches"] == 4  # max_turns 1: one search per question
        assert summary["tokens"]["completion"] > 0 and summary["latency_s"]["p50"] > 0
        rows = rows_of(out / policy)
        assert len(rows) == 4
        for row in rows:
            assert row["error"] is None and isinstance(row["answer"], str)
            assert row["gold"] and isinstance(row["correct"], bool)
            assert len(row["trace"]["searches"]) == 1
            assert row["entropy"] is not None and row["entropy"]["mean"] >= 0
            assert row["first_route"] == ("external" if policy == "always" else "internal")

    sweep = json.loads((out / "summary.json").read_text())
    assert sweep["kind"] == "sweep" and sweep["paired_questions"] == 4
    mean_curve = sweep["curves"]["mean"]
    assert mean_curve[0]["call_rate"] == 1.0 and mean_curve[-1]["call_rate"] == 0.0
    assert mean_curve[0]["accuracy"] == pytest.approx(sweep["accuracy_always"])
    assert mean_curve[-1]["accuracy"] == pytest.approx(sweep["accuracy_never"])

    for row in rows_of(out / "never"):
        assert row["reasoning"] is None or isinstance(row["reasoning"], str)
    for point in mean_curve:
        assert point["accuracy_interval"]["low"] <= point["accuracy"] <= point["accuracy_interval"]["high"]
    assert set(sweep["auroc_counts"]["mean"]) == {"auroc", "positives", "negatives", "reason"}

    # four questions are too few to show a signal: calibrate refuses and writes no threshold
    code = main(["calibrate", str(out), "--target-call-rate", "0.5", "--aggregate", "mean", "--no-plots"])
    assert code == EXIT_NO_SIGNAL
    env = dict(
        line.split("=", 1)
        for line in (out / "calibration.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env == {"SSRL_CALIBRATION_SIGNAL": "none"}
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["signal"] == "none" and cal["threshold"] is None
    assert cal["chosen"]["aggregate"] == "mean" and cal["chosen"]["call_rate"] <= 0.5


def test_samples_report_pass_at_k(server, tmp_path):
    out = tmp_path / "samples"
    assert main(eval_args(server, out, "--limit", "2", "--n", "2", "--seed", "1", "--policy", "never")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 0 and summary["n"] == 2
    assert set(summary["pass_at_k"]) == {"1", "2"}
    assert 0.0 <= summary["pass_at_k"]["1"] <= summary["pass_at_k"]["2"] <= 1.0
    assert 0.0 <= summary["majority_accuracy"] <= 1.0
    for row in rows_of(out):
        assert row["n"] == 2 and len(row["answers"]) == 2 and len(row["samples"]) == 2
        assert 0 <= row["n_correct"] <= 2
