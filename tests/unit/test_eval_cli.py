"""`ssrl eval` / `ssrl calibrate` against a loopback fake OpenAI-style server.

The fake (a Starlette app under uvicorn in a thread on 127.0.0.1) answers chat completions
with canned answers and a self-search trace whose routing follows the request's policy, and
counts the requests it saw per question, so resuming can be checked by what was re-asked.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clients.cli import main
from clients.eval_cli import EXIT_NO_SIGNAL, RESULTS, ResultsFile, final_rows, run_lock

# question -> (gold answers, mean entropy of its query, answer self-filled, answer searched)
QUESTIONS: dict[str, tuple[list[str], float, str, str]] = {
    "capital of France": (["Paris"], 0.2, "Paris", "Paris"),
    "author of Hamlet": (["Shakespeare"], 1.8, "Marlowe", "Shakespeare"),
    "largest planet": (["Jupiter"], 0.4, "Jupiter", "Saturn"),
    "tallest mountain": (["Everest", "Mount Everest"], 2.5, "K2", "Mount Everest"),
    "speed of light": (["299,792 km/s"], 1.0, "300,000 km/s", "186,000 miles per second"),
}
# With several samples, choice i answers SAMPLE_PATTERN[i % 4] ("right"/"wrong").
SAMPLE_PATTERN = {
    "capital of France": "RWWR",
    "author of Hamlet": "WWWW",
    "largest planet": "RRRW",
    "tallest mountain": "WWWR",
    "speed of light": "WWWW",
}


class FakeState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.fail: set[str] = set()
        self.lock = threading.Lock()


STATE = FakeState()


def trace_for(question: str, policy: str, threshold: float) -> dict[str, Any]:
    _, mean, _, _ = QUESTIONS[question]
    if policy == "always":
        external = True
    elif policy == "never":
        external = False
    else:
        external = mean > threshold
    return {
        "searches": [
            {
                "index": 0,
                "query": question,
                "entropy": {
                    "mean": mean,
                    "max": mean + 0.5,
                    "min_prob": max(0.0, 1 - mean / 3),
                    "ssrl": 0.3,
                    "tokens": 3,
                    "kind": "topk_lower_bound",
                    "per_token": [],
                },
                "decision": "external" if external else "internal",
                "reason": "fake",
                "policy": policy,
                "fallback": None,
                "backend": "fake" if external else None,
                "latency_s": 0.0,
                "documents": [],
                "information": "",
            }
        ],
        "external_calls": int(external),
        "internal_fills": int(not external),
        "fallbacks": 0,
        "turns": 1,
        "answered": True,
        "notes": [],
    }


async def models(_: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


async def chat(request: Request) -> JSONResponse:
    body = await request.json()
    question = body["messages"][-1]["content"]
    with STATE.lock:
        STATE.requests[question] += 1
        STATE.bodies.append(body)
        failing = question in STATE.fail
    if failing:
        return JSONResponse(
            {"error": {"message": "engine exploded", "type": "server_error", "param": None, "code": None}},
            status_code=500,
        )
    options = body.get("self_search") or {}
    policy = options.get("policy", "threshold")
    gold, _, internal, external = QUESTIONS[question]
    trace = trace_for(question, policy, options.get("threshold", 1.5))
    routed_external = trace["external_calls"] == 1
    if options.get("counterfactual") and not routed_external:
        # The server's exact counterfactual: the branch that searched at the first search.
        branch = {"at": 0, "query": question, "answer": external, "answered": True, "error": None}
        trace = {**trace, "counterfactuals": [branch]}
    choices = []
    for i in range(body.get("n", 1)):
        if body.get("n", 1) > 1:
            content = gold[0] if SAMPLE_PATTERN[question][i % 4] == "R" else "nonsense"
        else:
            content = external if routed_external else internal
        choices.append(
            {
                "index": i,
                "finish_reason": "stop",
                "self_search": trace,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "reasoning": f"thinking {i}: {question}",
                },
            }
        )
    return JSONResponse(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 5 * len(choices),
                "total_tokens": 10 + 5 * len(choices),
            },
        }
    )


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    app = Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def fake(fake_url: str) -> Iterator[str]:
    STATE.reset()
    yield fake_url
    STATE.reset()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (question, (gold, *_)) in enumerate(QUESTIONS.items()):
            f.write(json.dumps({"id": f"q{i}", "question": question, "answers": gold}) + "\n")
    return path


def run_eval(url: str, data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "eval",
            "--data",
            str(data),
            "--out",
            str(out),
            "--base-url",
            url,
            "--no-progress",
            "--concurrency",
            "3",
            *extra,
        ]
    )


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_writes_rows_summary_report(fake, data, tmp_path):
    out = tmp_path / "run"
    STATE.fail = {"speed of light"}
    assert run_eval(fake, data, out, "--policy", "never", "--seed", "7") == 0

    rows = read_lines(out / RESULTS)
    assert len(rows) == 5
    by_id = {r["id"]: r for r in rows}
    paris = by_id["q0"]
    assert paris["question"] == "capital of France" and paris["gold"] == ["Paris"]
    assert paris["answers"] == ["Paris"] and paris["correct"] is True and paris["f1"] == 1.0
    assert paris["trace"]["searches"][0]["decision"] == "internal"
    assert paris["entropy"]["mean"] == 0.2 and paris["first_route"] == "internal"
    assert paris["usage"]["completion_tokens"] == 5 and paris["latency_s"] >= 0
    # the transcript of the answer is kept
    assert paris["reasoning"] == "thinking 0: capital of France"
    assert paris["reasonings"] == ["thinking 0: capital of France"]
    assert by_id["q1"]["correct"] is False and by_id["q1"]["f1"] == 0.0
    assert by_id["q4"]["error"] == {"status": 500, "message": "engine exploded"}

    summary = json.loads((out / "summary.json").read_text())
    # q0 and q2 right when self-filled, q1 and q3 wrong; q4 failed (not scored)
    assert summary["scored"] == 4 and summary["errors"] == 1 and summary["questions"] == 5
    assert summary["em"] == 0.5
    assert summary["external_call_rate"] == 0.0
    assert summary["internal_fills"] == 4 and summary["searches"] == 4
    assert summary["tokens"]["prompt"] == 40 and summary["tokens"]["completion"] == 20
    assert (
        summary["latency_s"]["p50"] is not None and summary["latency_s"]["p99"] >= summary["latency_s"]["p50"]
    )
    # wrong self-fills (q1: 1.8, q3: 2.5) are the most uncertain: a perfect separator
    assert summary["auroc_wrong_self_fill"]["mean"] == 1.0
    # ... but it rests on 2 wrong and 2 right answers, and says so
    assert summary["auroc_counts"]["mean"] == {"auroc": 1.0, "positives": 2, "negatives": 2, "reason": None}
    low, high = summary["em_interval"]["low"], summary["em_interval"]["high"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert summary["f1_interval"]["low"] <= summary["f1"] <= summary["f1_interval"]["high"]
    report = (out / "report.md").read_text()
    assert f"exact match [95 % bootstrap interval] | 0.500 [{low:.3f}, {high:.3f}]" in report
    assert "| mean entropy | 1.000 | 2 | 2 |" in report and "engine exploded" in report

    sent = STATE.bodies[0]
    assert sent["model"] == "fake-model" and sent.get("n", 1) == 1 and sent["temperature"] == 0.0
    assert sent["seed"] == 7 and sent["self_search"] == {"policy": "never"}


def test_eval_plots(fake, data, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert run_eval(fake, data, out, "--policy", "never") == 0
    png = out / "entropy_hist.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plots"] == ["entropy_hist.png"]
    assert "![entropy_hist.png](entropy_hist.png)" in (out / "report.md").read_text()


def test_resume_requests_only_the_remaining_questions(fake, data, tmp_path):
    out = tmp_path / "run"
    assert run_eval(fake, data, out, "--limit", "3") == 0
    first = set(STATE.requests)
    assert len(first) == 3 and sum(STATE.requests.values()) == 3

    assert run_eval(fake, data, out) == 0  # the full set: only the two left are asked
    assert sum(STATE.requests.values()) == 5
    assert all(count == 1 for count in STATE.requests.values())
    assert len(read_lines(out / RESULTS)) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 5 and summary["requests_this_invocation"] == 2

    assert run_eval(fake, data, out) == 0  # nothing left
    assert sum(STATE.requests.values()) == 5


def test_interrupted_row_write_is_repaired_and_redone(fake, data, tmp_path):
    out = tmp_path / "run"
    assert run_eval(fake, data, out, "--limit", "2") == 0
    with open(out / RESULTS, "a", encoding="utf-8") as f:
        f.write('{"id": "q2", "question": "largest pla')  # a crash in the middle of a row
    assert run_eval(fake, data, out) == 0
    assert STATE.requests["largest planet"] == 1
    rows = read_lines(out / RESULTS)  # every line parses again
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2", "q3", "q4"]


def test_error_rows_do_not_abort_and_are_retried_on_resume(fake, data, tmp_path):
    out = tmp_path / "run"
    STATE.fail = {"author of Hamlet", "tallest mountain"}
    assert run_eval(fake, data, out, "--policy", "always") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 2 and summary["scored"] == 3
    assert {e["id"] for e in summary["error_examples"]} == {"q1", "q3"}
    assert summary["external_call_rate"] == 1.0

    STATE.fail = set()
    assert run_eval(fake, data, out, "--policy", "always") == 0
    assert STATE.requests["author of Hamlet"] == 2 and STATE.requests["capital of France"] == 1
    rows = ResultsFile(out / RESULTS).read()
    assert len(rows) == 7  # error rows stay in the log; the later success counts
    assert final_rows(rows)["q1"]["error"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 0 and summary["scored"] == 5
    assert summary["em"] == pytest.approx(3 / 5)  # searched: q0, q1, q3 right


def test_unreachable_server_is_a_clean_error(data, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert run_eval(f"http://127.0.0.1:{port}", data, tmp_path / "run") == 2
    assert "cannot reach the server" in capsys.readouterr().err


def test_n_samples_report_pass_at_k_and_majority(fake, data, tmp_path):
    out = tmp_path / "run"
    assert run_eval(fake, data, out, "--n", "4", "--no-plots") == 0
    assert STATE.bodies[0]["n"] == 4 and STATE.bodies[0]["temperature"] == 0.7
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4
    # correct samples per question: 2, 0, 3, 1, 0 of 4
    assert summary["pass_at_k"]["1"] == pytest.approx((2 + 0 + 3 + 1 + 0) / 20)
    assert summary["pass_at_k"]["2"] == pytest.approx((1 - 1 / 6 + 0 + 1 + 0.5 + 0) / 5)
    assert summary["pass_at_k"]["4"] == pytest.approx(3 / 5)
    # majority: q2 (3 of 4 right) wins; q0 ties 2-2, the first seen ("paris") wins
    assert summary["majority_accuracy"] == pytest.approx(2 / 5)
    row = {r["id"]: r for r in read_lines(out / RESULTS)}["q2"]
    assert row["n_correct"] == 3 and len(row["samples"]) == 4 and row["majority"]["correct"] is True


def test_a_different_run_in_the_same_directory_is_refused(fake, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_eval(fake, data, out, "--policy", "never") == 0
    before = sum(STATE.requests.values())
    assert run_eval(fake, data, out, "--policy", "always") == 2
    assert "other settings" in capsys.readouterr().err
    assert sum(STATE.requests.values()) == before


def test_sweep_then_calibrate_refuses_without_signal(fake, data, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_eval(fake, data, out, "--sweep", "--no-plots") == 0
    # One request per question: the never trajectory with its counterfactual branch.
    assert all(count == 1 for count in STATE.requests.values()) and len(STATE.requests) == 5
    assert all(b["self_search"] == {"policy": "never", "counterfactual": True} for b in STATE.bodies)
    never = json.loads((out / "never" / "summary.json").read_text())
    always = json.loads((out / "always" / "summary.json").read_text())
    assert never["external_call_rate"] == 0.0 and always["external_call_rate"] == 1.0
    sweep = json.loads((out / "summary.json").read_text())
    assert sweep["kind"] == "sweep" and sweep["paired_questions"] == 5
    assert sweep["accuracy_never"] == pytest.approx(0.4) and sweep["accuracy_always"] == pytest.approx(0.6)
    mean_curve = [(p["call_rate"], p["accuracy"]) for p in sweep["curves"]["mean"]]
    # routing the two most uncertain (q1 1.8, q3 2.5) to search answers 4 of 5
    assert (0.4, pytest.approx(0.8)) in mean_curve
    assert mean_curve[0] == (1.0, pytest.approx(0.6)) and mean_curve[-1] == (0.0, pytest.approx(0.4))
    assert sweep["ssrl_rule"] == {"call_rate": 1.0, "accuracy": pytest.approx(0.6)}
    # every point: an interval, random routing at its rate from the real runs, the gain
    for point in sweep["curves"]["mean"]:
        iv = point["accuracy_interval"]
        assert iv["low"] <= point["accuracy"] <= iv["high"]
        assert point["random_routing_accuracy"] == pytest.approx(0.4 + 0.2 * point["call_rate"])
        assert point["gain_over_random"] == pytest.approx(
            point["accuracy"] - point["random_routing_accuracy"]
        )
    # with 5 questions nothing is beyond random, and the report says so plainly
    assert not any(p["beats_random"] for p in sweep["curves"]["mean"])
    assert sweep["verdict"]["mean"]["beats_random"] is False
    assert sweep["auroc_counts"]["mean"]["positives"] == 3 and sweep["auroc_counts"]["mean"]["negatives"] == 2
    assert sweep["branches"] == {"branched": 5, "no_search": 0, "failed": 0}
    report = (out / "report.md").read_text()
    assert "random routing" in report and "N = 5 questions" in report
    assert "Branched: 5" in report
    assert "at 50% of always-search's calls" in report and "NOT beyond random routing" in report

    # the chosen point (rate 0.2, accuracy 0.6) does not beat random routing (0.44) beyond
    # the interval: refused, and calibration.env holds no threshold
    capsys.readouterr()
    code = main(["calibrate", str(out), "--max-accuracy-loss", "0", "--aggregate", "mean", "--no-plots"])
    assert code == EXIT_NO_SIGNAL
    captured = capsys.readouterr()
    assert "<- chosen" in captured.out and "AUROC" in captured.out and "3 wrong / 2 right" in captured.out
    assert "no signal" in captured.err
    env = (out / "calibration.env").read_text().splitlines()
    assert "SSRL_CALIBRATION_SIGNAL=none" in env
    assert not any(line.startswith(("SSRL_SEARCH_THRESHOLD", "SSRL_SEARCH_POLICY")) for line in env)
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["signal"] == "none" and cal["threshold"] is None and cal["refused"]
    assert cal["chosen"]["call_rate"] == pytest.approx(0.2) and cal["chosen"]["accuracy"] == pytest.approx(
        0.6
    )
    stats = cal["chosen_stats"]
    assert stats["random_routing_accuracy"] == pytest.approx(0.44) and stats["gain_interval"]["low"] <= 0

    # two runs of the same policy cannot be paired
    assert main(["calibrate", str(out / "never"), str(out / "never")]) == 2


def test_calibrate_refuses_a_single_run(fake, data, tmp_path, capsys):
    out = tmp_path / "one"
    assert run_eval(fake, data, out, "--policy", "threshold", "--threshold", "1.5", "--no-plots") == 0
    capsys.readouterr()
    assert main(["calibrate", str(out), "--target-call-rate", "0.2", "--no-plots"]) == 2
    assert "single run" in capsys.readouterr().err
    assert not (out / "calibration.env").exists() and not (out / "calibration.json").exists()


def write_run(directory: Path, policy: str, outcomes: list[tuple[float, bool]]) -> None:
    """A run directory as `ssrl eval` writes it: (mean entropy, correct) per question."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"self_search": {"policy": policy}}))
    with open(directory / RESULTS, "w", encoding="utf-8") as f:
        for i, (mean, correct) in enumerate(outcomes):
            row = {
                "id": f"q{i}",
                "correct": correct,
                "f1": float(correct),
                "error": None,
                "entropy": {"mean": mean, "max": mean, "min_prob": 0.5, "ssrl": 0.3},
                "first_route": "external" if policy == "always" else "internal",
            }
            f.write(json.dumps(row) + "\n")


def signal_pair(root: Path) -> Path:
    """80 questions: the 20 most uncertain are wrong self-filled and right searched; of the
    rest, 50 are right either way and 10 right only self-filled."""
    never, always = [], []
    for i in range(80):
        mean = i / 10
        uncertain = i >= 60
        never.append((mean, not uncertain))
        always.append((mean, uncertain or i % 6 != 0))
    write_run(root / "never", "never", never)
    write_run(root / "always", "always", always)
    return root


def test_calibrate_accepts_a_point_beyond_random(tmp_path, capsys):
    root = signal_pair(tmp_path / "sweep")
    assert (
        main(["calibrate", str(root), "--target-call-rate", "0.25", "--aggregate", "mean", "--no-plots"]) == 0
    )
    captured = capsys.readouterr()
    assert "beats random routing" in captured.out and captured.err == ""
    env = (root / "calibration.env").read_text().splitlines()
    assert "SSRL_SEARCH_POLICY=threshold" in env and "SSRL_CALIBRATION_SIGNAL=none" not in env
    tau = float(next(line for line in env if line.startswith("SSRL_SEARCH_THRESHOLD=")).split("=")[1])
    assert 5.9 < tau < 6.0
    cal = json.loads((root / "calibration.json").read_text())
    assert cal["signal"] == "beats_random" and cal["threshold"] == tau
    assert cal["chosen"]["call_rate"] == pytest.approx(0.25) and cal["chosen"]["accuracy"] == pytest.approx(
        1.0
    )
    assert cal["auroc_counts"]["mean"] == {"auroc": 1.0, "positives": 20, "negatives": 60, "reason": None}
    assert cal["chosen_stats"]["gain_interval"]["low"] > 0
    assert cal["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95}

    # the same input gives the same intervals (fixed seed)
    first = cal["chosen_stats"]
    assert (
        main(["calibrate", str(root), "--target-call-rate", "0.25", "--aggregate", "mean", "--no-plots"]) == 0
    )
    assert json.loads((root / "calibration.json").read_text())["chosen_stats"] == first


def test_calibrate_into_a_closed_pipe_writes_its_files_first(tmp_path):
    import subprocess
    import sys

    root = signal_pair(tmp_path / "sweep")
    code = "import sys; from clients.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "calibrate", str(root), "--target-call-rate", "0.25", "--no-plots"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is printed (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err
    assert "SSRL_SEARCH_THRESHOLD=" in (root / "calibration.env").read_text()
    assert json.loads((root / "calibration.json").read_text())["signal"] == "beats_random"


def test_calibrate_piped_into_head(tmp_path):
    import shlex
    import subprocess
    import sys

    root = signal_pair(tmp_path / "sweep")
    code = "import sys; from clients.cli import main; sys.exit(main(sys.argv[1:]))"
    command = (
        f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} calibrate {shlex.quote(str(root))} "
        '--target-call-rate 0.25 --no-plots | head -1; echo "status=${PIPESTATUS[0]}"'
    )
    done = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    first, status = done.stdout.splitlines()
    assert first.startswith("Calibrated from counterfactual pair") and status == "status=0"
    assert "Traceback" not in done.stderr
    assert (root / "calibration.env").is_file() and (root / "calibration.json").is_file()


def test_sweep_plots(fake, data, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    assert run_eval(fake, data, out, "--sweep") == 0
    for name in ("call_rate_accuracy.png", "entropy_hist.png", "never/entropy_hist.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    # five questions: no signal, but the plot (with its intervals) is still drawn
    assert main(["calibrate", str(out), "--target-call-rate", "0.3"]) == EXIT_NO_SIGNAL
    assert (out / "calibration_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_plots_without_matplotlib(fake, data, tmp_path, monkeypatch):
    import clients.eval_cli as eval_cli

    monkeypatch.setattr(eval_cli, "_pyplot", lambda: None)
    out = tmp_path / "sweep"
    assert run_eval(fake, data, out, "--sweep") == 0
    assert json.loads((out / "summary.json").read_text())["plots"] == []
    assert not (out / "call_rate_accuracy.png").exists()


def test_sweep_refuses_a_policy(fake, data, tmp_path):
    assert run_eval(fake, data, tmp_path / "s", "--sweep", "--policy", "always") == 2
    assert sum(STATE.requests.values()) == 0


def test_a_second_process_on_the_same_directory_is_refused(fake, data, tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock(out):  # as if another `ssrl eval` were writing there
        assert run_eval(fake, data, out) == 2
    assert "another `ssrl eval` is running" in capsys.readouterr().err
    assert sum(STATE.requests.values()) == 0
    assert run_eval(fake, data, out) == 0  # the lock is gone with its holder
    assert sum(STATE.requests.values()) == 5


def test_branch_rows_split_a_branched_run() -> None:
    from clients.eval_cli import branch_rows

    def row(qid: str, branches: list[dict[str, Any]] | None, error: Any = None) -> dict[str, Any]:
        trace = {"searches": [], "counterfactuals": branches} if branches is not None else {"searches": []}
        return {
            "id": qid,
            "gold": ["Paris"],
            "answer": "Lyon",
            "correct": False,
            "f1": 0.0,
            "trace": trace,
            "error": error,
        }

    rows = [
        row("searched", [{"at": 0, "answer": "Paris", "error": None}]),
        row("no search", None),
        row("failed", [{"at": 0, "answer": "", "error": "the search failed"}]),
        row("error", None, error={"status": 500, "message": "x"}),
    ]
    never, always, counts = branch_rows(rows)
    assert counts.to_dict() == {"branched": 1, "no_search": 1, "failed": 1}
    assert [r["id"] for r in never] == [r["id"] for r in always] == ["searched", "no search", "failed"]
    by_id = {r["id"]: r for r in always}
    assert (by_id["searched"]["answer"], by_id["searched"]["correct"]) == ("Paris", True)
    assert by_id["searched"]["first_route"] == "external"
    # Without a branch, searching changes nothing: the always side is the trajectory.
    assert by_id["no search"]["answer"] == by_id["failed"]["answer"] == "Lyon"
    assert all(r["answer"] == "Lyon" for r in never)


def test_retrieval_figures_on_a_graded_set() -> None:
    from clients.eval_cli import retrieval_figures

    rows = [
        {"gold_title": "Paris", "grade": "famous", "inserted_titles": ["Paris"], "correct": True},
        {"gold_title": "Lyon", "grade": "famous", "inserted_titles": ["Paris"], "correct": False},
        {"gold_title": "Vega", "grade": "obscure", "inserted_titles": ["Vega"], "correct": False},
        {"gold_title": "Nice", "grade": "obscure", "inserted_titles": [], "correct": True},
    ]
    figures = retrieval_figures(rows)
    assert figures is not None
    assert (figures["searched_externally"], figures["gold_inserted"]) == (3, 2)
    assert figures["gold_inserted_rate"] == pytest.approx(2 / 3)
    assert figures["em_given_gold_inserted"] == pytest.approx(0.5)
    assert figures["em_by_grade"] == {"famous": {"n": 2, "em": 0.5}, "obscure": {"n": 2, "em": 0.5}}
    assert retrieval_figures([{"correct": True}]) is None
