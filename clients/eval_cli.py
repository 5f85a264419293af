"""`ssrl eval` and `ssrl calibrate`: accuracy, search calls and thresholds, against a live server.

`ssrl eval` sends every question of a QA set (`{id, question, answers}` per JSONL line) as a
chat completion to a running ssrl server, scores the answer (`message.content`, the last
`<answer>`) with SQuAD exact match and F1 against the gold answers, and writes to `--out`:

- `results.jsonl`: one row per question, appended atomically (line + flush + fsync) as each
  answer arrives, so an interrupted run loses nothing finished; re-running the same command
  skips every question that already has a row without error.
- `summary.json` (written atomically), `report.md`, and PNG plots (`entropy_hist.png`; with
  `--sweep` also `call_rate_accuracy.png`).
- `config.json`: what defines the run; a resumed run must match it.

`ssrl eval --sweep` runs the questions once with policy `never` and exact counterfactuals
(`self_search.counterfactual`: at the first search the server also runs the branch that
searches externally from the identical prefix) into OUT/branched, splits that run into a
`never` (OUT/never) and an `always` (OUT/always) run of the same questions, and derives the
accuracy against external-call rate of every threshold (see `router.calibration` and
docs/evaluation.md).

`ssrl calibrate SWEEP_DIR` (or `NEVER_RUN ALWAYS_RUN`) picks the threshold for a target call
rate or a maximum accuracy loss from such runs and writes `calibration.json` and
`calibration.env` (`SSRL_SEARCH_THRESHOLD=...`, read by `ssrl serve` from the environment),
then prints; when the chosen point does not beat random routing at its call rate beyond the
95 % bootstrap interval it writes a "no signal" `calibration.env` without a threshold and
exits with EXIT_NO_SIGNAL. Every accuracy comes with its bootstrap interval and every AUROC
with its class counts (docs/evaluation.md, "Statistics").

Pure scoring lives in `router.scoring` and `router.calibration`; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from clients.client import (
    AsyncSSRLClient,
    ChatOptions,
    Policy,
    SSRLAPIError,
    SSRLConnectionError,
    SSRLError,
    build_chat_body,
    normalize_base_url,
)
from clients.files import atomic_write_json, atomic_write_text
from router.calibration import (
    MIN_SIGNAL_QUESTIONS,
    Calibration,
    CurvePoint,
    PointStats,
    Question,
    aggregate_auroc,
    auroc_detail,
    calibrate,
    choose_for_call_rate,
    curve_stats,
    render_env,
    render_no_signal_env,
    run_accuracies,
    run_intervals,
    ssrl_rule_point,
    threshold_curve,
    uncertainty,
    verdict_at_rate,
)
from router.entropy import AGGREGATES
from router.scoring import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    Interval,
    best_exact_match,
    best_f1,
    bootstrap_mean,
    bootstrap_weights,
    is_repetitive,
    majority_vote,
    mean,
    pass_at_k_curve,
    percentile,
)

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
REPORT = "report.md"
CONFIG = "config.json"
ENTROPY_PLOT = "entropy_hist.png"
CURVE_PLOT = "call_rate_accuracy.png"
CALIBRATION_ENV = "calibration.env"
CALIBRATION_JSON = "calibration.json"
CALIBRATION_PLOT = "calibration_curve.png"
SWEEP_POLICIES = ("never", "always")
METRIC_LABELS = {"em": "exact match", "f1": "F1"}
AGGREGATE_LABELS = {
    "mean": "mean entropy",
    "max": "max entropy",
    "min_prob": "1 - min token prob",
    "ssrl": "SSRL sampled-token term",
}
# Call rates at which reports tabulate the curves.
TABLE_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Fields of config.json that define a run: a resumed run must agree on all of them.
IDENTITY_FIELDS = (
    "data",
    "model",
    "n",
    "temperature",
    "seed",
    "max_tokens",
    "self_search",
    "shuffle",
)
REPO_ROOT = Path(__file__).resolve().parents[1]


class EvalError(Exception):
    """A problem the user must fix (bad data, mismatched run directory, server unreachable)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ResultsFile:
    """`results.jsonl`: rows appended one whole line at a time, each flushed and fsynced.

    A crash can at worst leave a partial last line; `repair()` cuts it off before appending,
    and `read()` skips any line that does not parse.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "id" in row:
                    rows.append(row)
        return rows

    def repair(self) -> None:
        """Drop a partial last line (a row whose write was interrupted)."""
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory/.lock` for one run: two processes appending to
    the same results.jsonl would ask every question twice."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EvalError(f"another `ssrl eval` is running in {directory}") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def final_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The row that counts per question id: the last without error, else the last one."""
    chosen: dict[str, dict[str, Any]] = {}
    for row in rows:
        rid = str(row["id"])
        previous = chosen.get(rid)
        if previous is None or row.get("error") is None or previous.get("error") is not None:
            chosen[rid] = dict(row)
    return chosen


# ----------------------------------------------------------------------------- questions


# `--data dev`: the set `ssrl devset build` writes from the default offline corpus, built on
# first use into the cache (the path is that command's default --out).
DEV_PRESET = "dev"


def dev_set_path() -> Path:
    """`$SSRL_CACHE_DIR`, else `$XDG_CACHE_HOME/ssrl`, else `~/.cache/ssrl`; then devsets/dev.jsonl."""
    cache = os.environ.get("SSRL_CACHE_DIR")
    base = (
        Path(cache).expanduser()
        if cache
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssrl"
    )
    return base / "devsets" / "dev.jsonl"


def ensure_dev_set() -> Path:
    """The dev set's path, running `ssrl devset build` (the server side, in a subprocess) if needed."""
    import subprocess

    path = dev_set_path()
    if not path.is_file():
        print(f"ssrl eval: building the dev set into {path} (once)", file=sys.stderr)
        cmd = [sys.executable, "-m", "clients.cli", "devset", "build", "--out", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr or proc.stdout).strip()[-1000:]
            raise EvalError(
                f"could not build the dev set (`ssrl devset build` exited {proc.returncode}): {tail}"
            )
    return path.resolve()


def resolve_data(spec: str) -> Path:
    """A JSONL path, the preset `dev`, or the name of a shared QA set (`nq_open_dev`) under ../shared/data/qa."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    if spec == DEV_PRESET:
        return ensure_dev_set()
    if "/" not in spec:
        name = spec if spec.endswith(".jsonl") else spec + ".jsonl"
        for base in (REPO_ROOT.parent / "shared" / "data" / "qa", Path("/work/shared/data/qa")):
            if (base / name).is_file():
                return (base / name).resolve()
    raise EvalError(f"no question file {spec!r} (a JSONL path or a set in ../shared/data/qa)")


def load_questions(
    path: Path, limit: int | None = None, shuffle: bool = False, seed: int | None = None
) -> list[dict[str, Any]]:
    """`{id, question, answers}` rows; shuffled with `seed` when asked, then cut to `limit`."""
    questions: list[dict[str, Any]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(item, dict) or not isinstance(item.get("question"), str):
                raise EvalError(f"{path}:{number}: expected an object with a 'question' string")
            answers = item.get("answers", item.get("answer"))
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise EvalError(f"{path}:{number}: 'answers' must be a non-empty list of strings")
            qid = str(item.get("id", f"line-{number}"))
            if qid in seen:
                raise EvalError(f"{path}:{number}: duplicate id {qid!r}")
            seen.add(qid)
            row = {"id": qid, "question": item["question"], "answers": answers}
            # Graded sets (`--data dev`) name the article holding the answer and its grade.
            for key in ("gold_title", "grade"):
                if isinstance(item.get(key), str):
                    row[key] = item[key]
            questions.append(row)
    if shuffle:
        random.Random(seed if seed is not None else 0).shuffle(questions)
    if limit is not None:
        questions = questions[: max(0, limit)]
    return questions


# ----------------------------------------------------------------------------- configuration


@dataclass
class EvalConfig:
    base_url: str
    data: Path
    out: Path
    api_key: str | None = None
    model: str | None = None
    concurrency: int = 8
    limit: int | None = None
    seed: int | None = None
    shuffle: bool = False
    n: int = 1
    temperature: float | None = None
    max_tokens: int | None = None
    # The request's `self_search` object (only the fields given).
    self_search: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 600.0
    progress: bool = True
    plots: bool = True

    @property
    def effective_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.n == 1 else 0.7

    def identity(self) -> dict[str, Any]:
        return {
            "data": str(self.data),
            "model": self.model,
            "n": self.n,
            "temperature": self.effective_temperature,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "self_search": dict(sorted(self.self_search.items())),
            "shuffle": self.shuffle,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.identity(),
            "base_url": self.base_url,
            "limit": self.limit,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
        }

    def for_policy(self, policy: str, out: Path) -> EvalConfig:
        from dataclasses import replace

        return replace(self, out=out, self_search={**self.self_search, "policy": policy})


def normalise_base_url(url: str) -> str:
    """The server's root URL (a trailing `/v1` accepted), as the typed client takes it."""
    return normalize_base_url(url)


def check_run_dir(config: EvalConfig) -> None:
    """Write config.json for a new run; for an existing one, insist on the same identity."""
    path = config.out / CONFIG
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EvalError(f"{path} is not JSON: {exc.msg}") from exc
        mine = config.identity()
        diff = [
            f"{k}: {saved.get(k)!r} there, {mine[k]!r} now"
            for k in IDENTITY_FIELDS
            if _canon(saved.get(k)) != _canon(mine[k])
        ]
        if diff:
            raise EvalError(
                f"{config.out} holds a run with other settings ({'; '.join(diff)}); "
                "resume it with the same settings or choose another --out"
            )
    atomic_write_json(path, config.to_json())


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# ----------------------------------------------------------------------------- scoring a response


def first_search(trace: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The first search of a trajectory that was decided (not skipped as empty)."""
    for search in (trace or {}).get("searches") or []:
        if search.get("decision") in ("external", "internal"):
            found: dict[str, Any] = search
            return found
    return None


def first_entropy(trace: Mapping[str, Any] | None) -> dict[str, float] | None:
    """{mean, max, min_prob, ssrl} of the first decided search, None without one."""
    search = first_search(trace)
    if search is None:
        return None
    entropy = search.get("entropy") or {}
    if entropy.get("kind") == "empty" or not all(a in entropy for a in AGGREGATES):
        return None
    return {a: float(entropy[a]) for a in AGGREGATES}


def first_route(trace: Mapping[str, Any] | None) -> str | None:
    """How the first search was actually served: external, internal (a fallback counts as
    internal: the model filled it), or None without a search."""
    search = first_search(trace)
    if search is None:
        return None
    if search.get("decision") == "external" and not search.get("fallback"):
        return "external"
    return "internal"


def trace_counts(trace: Mapping[str, Any] | None) -> dict[str, int]:
    """External calls, internal fills, fallbacks and turns of a choice (all its vote samples)."""
    trace = trace or {}
    parts = (trace.get("vote") or {}).get("samples") or [trace]
    keys = ("external_calls", "internal_fills", "fallbacks", "turns")
    return {k: sum(int(p.get(k) or 0) for p in parts) for k in keys}


def inserted_titles(searches: Sequence[Mapping[str, Any]]) -> list[str]:
    """Titles of the documents external searches inserted, in order."""
    return [
        str(d.get("title") or "")
        for s in searches
        if s.get("decision") == "external" and not s.get("fallback")
        for d in s.get("documents") or []
    ]


def retrieval_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """On a set whose rows name the article that holds the answer (`gold_title`): how often an
    external search inserted it (query quality), exact match when it was inserted (reading),
    and exact match per grade. None on sets without gold titles."""
    graded = [r for r in rows if r.get("gold_title")]
    if not graded:
        return None
    searched = [r for r in graded if r.get("inserted_titles")]
    hit = [r for r in searched if r["gold_title"] in r["inserted_titles"]]
    grades: dict[str, list[float]] = {}
    for r in graded:
        grades.setdefault(str(r.get("grade") or "-"), []).append(float(bool(r["correct"])))
    return {
        "questions": len(graded),
        "searched_externally": len(searched),
        "gold_inserted": len(hit),
        "gold_inserted_rate": len(hit) / len(searched) if searched else None,
        "em_given_gold_inserted": mean(float(bool(r["correct"])) for r in hit),
        "em_by_grade": {g: {"n": len(v), "em": mean(v)} for g, v in sorted(grades.items())},
    }


def score_response(question: Mapping[str, Any], body: Mapping[str, Any], latency_s: float) -> dict[str, Any]:
    """The result row of one answered question."""
    gold = list(question["answers"])
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        raise ValueError("the response has no choices")
    samples = []
    for choice in choices:
        message = choice.get("message") or {}
        answer = message.get("content")
        answer = answer if isinstance(answer, str) else ""
        reasoning = message.get("reasoning")
        if reasoning is None:
            reasoning = message.get("reasoning_content")
        trace = choice.get("self_search") or {}
        samples.append(
            {
                "answer": answer,
                "reasoning": reasoning if isinstance(reasoning, str) else None,
                "correct": best_exact_match(answer, gold),
                "f1": best_f1(answer, gold),
                "finish_reason": choice.get("finish_reason"),
                "answered": trace.get("answered"),
                "trace": trace,
            }
        )
    head = samples[0]
    counts = [trace_counts(s["trace"]) for s in samples]
    row: dict[str, Any] = {
        "id": question["id"],
        "question": question["question"],
        "gold": gold,
        "answer": head["answer"],
        # The transcript (`message.reasoning`) that led to the answer.
        "reasoning": head["reasoning"],
        "correct": head["correct"],
        "f1": head["f1"],
        "answers": [s["answer"] for s in samples],
        "reasonings": [s["reasoning"] for s in samples],
        "n": len(samples),
        "n_correct": sum(1 for s in samples if s["correct"]),
        "trace": head["trace"],
        "entropy": first_entropy(head["trace"]),
        "first_route": first_route(head["trace"]),
        "external_calls": sum(c["external_calls"] for c in counts),
        "internal_fills": sum(c["internal_fills"] for c in counts),
        "fallbacks": sum(c["fallbacks"] for c in counts),
        "turns": sum(c["turns"] for c in counts),
        "latency_s": round(latency_s, 4),
        "usage": body.get("usage") or {},
        "repetitive": is_repetitive(head["answer"]),
        "inserted_titles": inserted_titles(head["trace"].get("searches") or []),
        "error": None,
        "finished_at": _now(),
    }
    for key in ("gold_title", "grade"):
        if key in question:
            row[key] = question[key]
    if len(samples) > 1:
        vote = majority_vote([s["answer"] for s in samples])
        row["majority"] = {
            "answer": vote.answer,
            "count": vote.count,
            "correct": best_exact_match(vote.answer, gold),
        }
        row["samples"] = samples
    return row


def error_row(
    question: Mapping[str, Any], status: int | None, message: str, latency_s: float
) -> dict[str, Any]:
    return {
        "id": question["id"],
        "question": question["question"],
        "gold": list(question["answers"]),
        "answer": None,
        "correct": None,
        "f1": None,
        "latency_s": round(latency_s, 4),
        "error": {"status": status, "message": message[:2000]},
        "finished_at": _now(),
    }


# ----------------------------------------------------------------------------- running


def chat_options(config: EvalConfig) -> ChatOptions:
    """What each request of the run asks, as the typed client's options."""
    options: ChatOptions = {"n": config.n, "temperature": config.effective_temperature}
    if config.seed is not None:
        options["seed"] = config.seed
    if config.max_tokens is not None:
        options["max_tokens"] = config.max_tokens
    if config.self_search:
        options["extra_body"] = {"self_search": dict(config.self_search)}
    return options


def request_body(config: EvalConfig, question: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body sent for `question` (what the typed client builds from `chat_options`)."""
    return build_chat_body(question["question"], config.model or "", **chat_options(config))


async def ask(client: AsyncSSRLClient, config: EvalConfig, question: Mapping[str, Any]) -> dict[str, Any]:
    """One question, one request; any failure becomes an error row, never an exception."""
    started = time.perf_counter()
    try:
        result = await client.chat(question["question"], model=config.model, **chat_options(config))
    except SSRLAPIError as exc:
        return error_row(question, exc.status_code, exc.message, time.perf_counter() - started)
    except SSRLConnectionError as exc:
        return error_row(question, None, str(exc), time.perf_counter() - started)
    except SSRLError as exc:
        return error_row(question, 200, f"unreadable response: {exc}", time.perf_counter() - started)
    latency = time.perf_counter() - started
    try:
        return score_response(question, result.raw, latency)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        return error_row(question, 200, f"unreadable response: {type(exc).__name__}: {exc}", latency)


async def resolve_model(client: AsyncSSRLClient) -> str:
    try:
        return await client.default_model()
    except SSRLConnectionError as exc:
        raise EvalError(f"cannot reach the server: {exc}") from exc
    except SSRLAPIError as exc:
        raise EvalError(f"GET /v1/models answered {exc.status_code}: {exc.message}") from exc
    except SSRLError as exc:
        raise EvalError(f"{exc}; pass --model") from exc


class _NoProgress:
    """Stands in for a tqdm bar when tqdm is not installed (it comes with `client-extras`)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return _NoProgress()

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc=desc,
        unit="q",
        dynamic_ncols=True,
        file=sys.stderr,
    )


async def run_eval_async(
    config: EvalConfig, questions: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Run (or resume) one evaluation; returns its summary. Writes everything under config.out."""
    if questions is None:
        questions = load_questions(config.data, config.limit, config.shuffle, config.seed)
    with run_lock(config.out):
        return await _run_eval_locked(config, questions)


async def _run_eval_locked(config: EvalConfig, questions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    import httpx

    results = ResultsFile(config.out / RESULTS)
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    timeout = httpx.Timeout(config.timeout_s, connect=min(30.0, config.timeout_s))
    started = time.perf_counter()
    # No retries: a failed question becomes an error row, and the next run asks it again.
    async with (
        httpx.AsyncClient(timeout=timeout, limits=limits) as http,
        AsyncSSRLClient(config.base_url, config.api_key or "", max_retries=0, http_client=http) as client,
    ):
        if config.model is None:
            config.model = await resolve_model(client)
        check_run_dir(config)
        results.repair()
        done = {str(r["id"]) for r in results.read() if r.get("error") is None}
        todo = [q for q in questions if q["id"] not in done]
        bar = _progress(
            len(questions),
            len(questions) - len(todo),
            config.progress,
            config.self_search.get("policy") or "eval",
        )
        queue: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
        for q in todo:
            queue.put_nowait(q)
        tally = {"right": 0, "done": 0, "errors": 0}

        async def worker() -> None:
            while True:
                try:
                    q = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                row = await ask(client, config, q)
                results.append(row)  # one event loop: appends never interleave
                tally["done"] += 1
                tally["errors"] += row.get("error") is not None
                tally["right"] += bool(row.get("correct"))
                bar.update(1)
                bar.set_postfix(
                    em=f"{tally['right'] / tally['done']:.3f}", errors=tally["errors"], refresh=False
                )

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, config.concurrency))))
        finally:
            bar.close()
    wall_s = time.perf_counter() - started
    rows = final_rows(results.read())
    summary = summarize([rows[q["id"]] for q in questions if q["id"] in rows], len(questions), config)
    summary["wall_s_this_invocation"] = round(wall_s, 3)
    summary["requests_this_invocation"] = len(todo)
    write_outputs(config, summary, [rows[q["id"]] for q in questions if q["id"] in rows])
    return summary


def run_eval(config: EvalConfig) -> dict[str, Any]:
    return asyncio.run(run_eval_async(config))


# ----------------------------------------------------------------------------- summary


def _usage_total(rows: Sequence[Mapping[str, Any]], key: str) -> int:
    return sum(int((r.get("usage") or {}).get(key) or 0) for r in rows)


METRICS = ("em", "f1")


def outcome(row: Mapping[str, Any], metric: str = "em") -> float:
    """A scored row's outcome in 0..1: exact match (1/0) or its F1."""
    if metric == "em":
        return float(bool(row.get("correct")))
    if metric == "f1":
        return float(row.get("f1") or 0.0)
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def questions_of_run(rows: Sequence[Mapping[str, Any]], metric: str = "em") -> list[Question]:
    """Calibration inputs of one run: each question's first-search entropy and its outcome
    (exact match, or F1 with metric "f1") under the route that search actually took."""
    out = []
    for r in rows:
        if r.get("error") is not None:
            continue
        route = r.get("first_route")
        correct = outcome(r, metric)
        out.append(
            Question(
                id=str(r["id"]),
                entropy=r.get("entropy"),
                correct_internal=correct if route in ("internal", None) else None,
                correct_external=correct if route == "external" else None,
            )
        )
    return out


def summarize(
    rows: Sequence[Mapping[str, Any]], selected: int, config: EvalConfig | None = None
) -> dict[str, Any]:
    """Aggregate figures of a run's final rows (errors reported, not scored)."""
    ok = [r for r in rows if r.get("error") is None]
    errors = [r for r in rows if r.get("error") is not None]
    external = sum(int(r.get("external_calls") or 0) for r in ok)
    internal = sum(int(r.get("internal_fills") or 0) for r in ok)
    latencies = [float(r["latency_s"]) for r in ok if r.get("latency_s") is not None]
    n = min((int(r.get("n") or 1) for r in ok), default=1)
    summary: dict[str, Any] = {
        "kind": "eval",
        "config": config.to_json() if config is not None else None,
        "questions": selected,
        "scored": len(ok),
        "errors": len(errors),
        "not_run": selected - len(rows),
        "em": mean(float(bool(r["correct"])) for r in ok),
        "f1": mean(float(r["f1"]) for r in ok),
        "em_interval": _interval(bootstrap_mean([float(bool(r["correct"])) for r in ok])),
        "f1_interval": _interval(bootstrap_mean([float(r["f1"]) for r in ok])),
        "answered_rate": mean(float(bool((r.get("trace") or {}).get("answered"))) for r in ok),
        "n": n,
        "searches": external + internal,
        "external_calls": external,
        "internal_fills": internal,
        "fallbacks": sum(int(r.get("fallbacks") or 0) for r in ok),
        "external_call_rate": external / (external + internal) if external + internal else None,
        "turns_mean": mean(float(r.get("turns") or 0) for r in ok),
        "external_calls_per_question": mean(float(r.get("external_calls") or 0) for r in ok),
        "tokens": {
            "prompt": _usage_total(ok, "prompt_tokens"),
            "completion": _usage_total(ok, "completion_tokens"),
            "total": _usage_total(ok, "total_tokens"),
            "completion_mean": mean(float((r.get("usage") or {}).get("completion_tokens") or 0) for r in ok),
        },
        "latency_s": {
            "mean": mean(latencies),
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=None),
        },
        "error_examples": [{"id": r["id"], **r["error"]} for r in errors[:10]],
        "finished_at": _now(),
    }
    if n > 1:
        counts = [(int(r["n"]), int(r["n_correct"])) for r in ok]
        summary["pass_at_k"] = {str(k): v for k, v in pass_at_k_curve(counts, n).items()}
        summary["majority_accuracy"] = mean(float(bool(r["majority"]["correct"])) for r in ok)
    summary["repetitive_rate"] = mean(float(bool(r.get("repetitive"))) for r in ok)
    retrieval = retrieval_figures(ok)
    if retrieval is not None:
        summary["retrieval"] = retrieval
    qs = questions_of_run(rows)
    summary["entropy_recorded"] = sum(1 for q in qs if q.entropy is not None)
    summary["auroc_wrong_self_fill"] = {a: aggregate_auroc(qs, a) for a in AGGREGATES}
    summary["auroc_counts"] = {a: auroc_detail(qs, a) for a in AGGREGATES}
    summary["self_filled_scored"] = sum(
        1 for q in qs if q.entropy is not None and q.correct_internal is not None
    )
    return summary


# ----------------------------------------------------------------------------- reports and plots


def _interval(interval: Interval | None) -> dict[str, float] | None:
    return interval.to_dict() if interval is not None else None


def _fmt_ci(value: Any, interval: Mapping[str, float] | Interval | None, digits: int = 3) -> str:
    """`0.420 [0.380, 0.460]`: a value and its 95 % bootstrap interval."""
    if value is None:
        return "–"
    if interval is None:
        return _fmt(value, digits)
    low, high = (
        (interval.low, interval.high)
        if isinstance(interval, Interval)
        else (interval["low"], interval["high"])
    )
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _fmt_auroc(detail: Mapping[str, Any] | None) -> str:
    """`0.983 (1 wrong / 59 right)`, or `– (undefined: reason)`."""
    if not detail:
        return "–"
    counts = f"{detail['positives']} wrong / {detail['negatives']} right"
    if detail.get("auroc") is None:
        return f"– ({counts}; undefined: {detail.get('reason')})"
    return f"{detail['auroc']:.3f} ({counts})"


def auroc_table(counts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown: AUROC per aggregate with its class counts."""
    lines = [
        "| aggregate | AUROC (wrong self-filled answer) | wrong (positives) | right (negatives) |",
        "|---|---|---:|---:|",
    ]
    for agg in AGGREGATES:
        d = counts.get(agg) or {}
        score = _fmt(d.get("auroc")) if d.get("auroc") is not None else f"undefined: {d.get('reason')}"
        lines.append(
            f"| {AGGREGATE_LABELS[agg]} | {score} | {d.get('positives', 0)} | {d.get('negatives', 0)} |"
        )
    return lines


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_report(summary: Mapping[str, Any], plots: Sequence[str]) -> str:
    cfg = summary.get("config") or {}
    lat = summary["latency_s"]
    tok = summary["tokens"]
    lines = [
        "# ssrl eval report",
        "",
        f"- Data: `{cfg.get('data')}` ({summary['questions']} questions selected)",
        f"- Server: `{cfg.get('base_url')}`, model `{cfg.get('model')}`",
        f"- Request: n={cfg.get('n')}, temperature={cfg.get('temperature')}, seed={cfg.get('seed')}, "
        f"self_search={json.dumps(cfg.get('self_search') or {})}",
        f"- Finished: {summary['finished_at']}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| exact match [95 % bootstrap interval] | {_fmt_ci(summary['em'], summary.get('em_interval'))} |",
        f"| F1 [95 % bootstrap interval] | {_fmt_ci(summary['f1'], summary.get('f1_interval'))} |",
        f"| scored / errors / not run | {summary['scored']} / {summary['errors']} / {summary['not_run']} |",
        f"| answered with an `<answer>` | {_fmt(summary['answered_rate'])} |",
        f"| searches | {summary['searches']} |",
        f"| external calls | {summary['external_calls']} |",
        f"| internal fills | {summary['internal_fills']} (fallbacks {summary['fallbacks']}) |",
        f"| external-call rate (external / searches) | {_fmt(summary['external_call_rate'])} |",
        f"| turns per question | {_fmt(summary['turns_mean'], 2)} |",
        f"| tokens prompt / completion | {tok['prompt']} / {tok['completion']} |",
        f"| latency mean / p50 / p99 (s) | {_fmt(lat['mean'], 2)} / {_fmt(lat['p50'], 2)} / {_fmt(lat['p99'], 2)} |",
        f"| degenerate repetition in the answer | {_fmt(summary.get('repetitive_rate'))} |",
    ]
    retrieval = summary.get("retrieval")
    if retrieval:
        lines += [
            f"| gold article inserted (of {retrieval['searched_externally']} questions searched "
            f"externally) | {_fmt(retrieval['gold_inserted_rate'])} ({retrieval['gold_inserted']}) |",
            f"| exact match when the gold article was inserted | {_fmt(retrieval['em_given_gold_inserted'])} |",
        ]
        lines += [
            f"| exact match, grade `{g}` (n = {v['n']}) | {_fmt(v['em'])} |"
            for g, v in retrieval["em_by_grade"].items()
        ]
    if "pass_at_k" in summary:
        lines += [
            f"| majority-vote accuracy ({summary['n']} samples) | {_fmt(summary['majority_accuracy'])} |",
            "",
            "| k | pass@k |",
            "|---|---|",
        ]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in summary["pass_at_k"].items()]
    lines += [
        "",
        "### Entropy of the first query as a predictor of a wrong self-filled answer",
        "",
        f"{summary['self_filled_scored']} questions whose first search was self-filled. AUROC "
        "(1.0: the aggregate ranks every wrong answer above every right one; 0.5: no signal). "
        "Read it with its class counts: an AUROC resting on a handful of wrong (or right) "
        "answers says little.",
        "",
        *auroc_table(summary.get("auroc_counts") or {}),
    ]
    if summary["error_examples"]:
        lines += ["", "### Errors", ""]
        lines += [f"- `{e['id']}`: {e.get('status')} {e.get('message')}" for e in summary["error_examples"]]
    if plots:
        lines += ["", "### Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_entropy_histograms(questions: Sequence[Question], path: Path) -> bool:
    """Histograms per aggregate of the first query's uncertainty, self-filled right vs wrong."""
    plt = _pyplot()
    if plt is None:
        return False
    usable = [q for q in questions if q.entropy is not None and q.correct_internal is not None]
    if not usable:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, agg in zip(axes.flat, AGGREGATES, strict=True):
        values = [uncertainty(q.entropy or {}, agg) for q in usable]
        right = [v for v, q in zip(values, usable, strict=True) if (q.correct_internal or 0.0) >= 0.5]
        wrong = [v for v, q in zip(values, usable, strict=True) if (q.correct_internal or 0.0) < 0.5]
        lo, hi = min(values), max(values)
        bins = 20 if hi > lo else 1
        rng = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
        ax.hist(right, bins=bins, range=rng, alpha=0.6, label=f"right ({len(right)})", color="tab:green")
        ax.hist(wrong, bins=bins, range=rng, alpha=0.6, label=f"wrong ({len(wrong)})", color="tab:red")
        ax.set_title(f"{AGGREGATE_LABELS[agg]}\nAUROC {_fmt_auroc(auroc_detail(usable, agg))}", fontsize=9)
        ax.set_xlabel("uncertainty of the first query")
        ax.set_ylabel("questions")
        ax.legend()
    fig.suptitle(f"First-query uncertainty: self-filled answer right vs wrong (N={len(usable)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(
    curves: Mapping[str, Sequence[CurvePoint]],
    acc_internal: float,
    acc_external: float,
    path: Path,
    chosen: CurvePoint | None = None,
    ylabel: str = "exact match",
    stats: Mapping[str, Sequence[PointStats]] | None = None,
    intervals: Mapping[str, Interval] | None = None,
    questions: int | None = None,
) -> bool:
    """Accuracy against external-call rate: one line per aggregate (with its 95 % bootstrap
    band when `stats` is given), random routing, the never/always runs, SSRL's rule.

    `acc_internal` / `acc_external` must be the real never / always runs' accuracies: they
    draw the reference lines. The y axis is [0, 1] whatever the data, N is in the title.
    """
    plt = _pyplot()
    if plt is None:
        return False
    stats = stats or {}
    intervals = intervals or {}
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    markers = {"mean": "o", "max": "s", "min_prob": "^", "ssrl": "D"}
    for agg, points in curves.items():
        pairs = [(p, st) for p, st in itertools.zip_longest(points, stats.get(agg) or []) if p is not None]
        pairs = sorted((x for x in pairs if x[0].accuracy is not None), key=lambda x: x[0].call_rate)
        if not pairs:
            continue
        (line,) = ax.plot(
            [p.call_rate for p, _ in pairs],
            [p.accuracy for p, _ in pairs],
            marker=markers.get(agg, "."),
            markersize=3,
            linewidth=1.4,
            label=f"threshold on {AGGREGATE_LABELS[agg]}",
        )
        if all(st is not None for _, st in pairs):
            ax.fill_between(
                [p.call_rate for p, _ in pairs],
                [st.accuracy_interval.low for _, st in pairs],
                [st.accuracy_interval.high for _, st in pairs],
                color=line.get_color(),
                alpha=0.12,
                linewidth=0,
            )
    ax.plot(
        [0, 1],
        [acc_internal, acc_external],
        linestyle="--",
        color="gray",
        label="random routing (expected, from the never/always runs)",
    )
    for rate, acc, name in ((0.0, acc_internal, "never"), (1.0, acc_external, "always")):
        iv = intervals.get(name)
        if iv is not None:
            ax.errorbar(
                [rate],
                [acc],
                yerr=[[acc - iv.low], [iv.high - acc]],
                color="gray",
                capsize=4,
                fmt="o",
                markersize=4,
            )
    ssrl = ssrl_rule_point(acc_external)
    ax.scatter(
        [ssrl["call_rate"]],
        [ssrl["accuracy"]],
        marker="*",
        s=160,
        color="black",
        zorder=5,
        label="SSRL rule (first search external)",
    )
    if chosen is not None and chosen.accuracy is not None:
        ax.scatter(
            [chosen.call_rate],
            [chosen.accuracy],
            marker="X",
            s=120,
            color="tab:red",
            zorder=6,
            label=f"chosen: {chosen.aggregate} tau={chosen.threshold:.4g}",
        )
    ax.set_xlabel("external-call rate (external searches / searches)")
    ax.set_ylabel(f"{ylabel} (counterfactual)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0.0, 1.0)
    n_text = f", N={questions} questions" if questions is not None else ""
    ax.set_title(
        f"{ylabel[0].upper() + ylabel[1:]} against external-call rate{n_text}\n"
        "bands and bars: 95 % bootstrap intervals"
    )
    ax.grid(alpha=0.3)
    # Below the axes: a legend inside would hide part of the curves.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_outputs(config: EvalConfig, summary: dict[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    plots: list[str] = []
    if config.plots and plot_entropy_histograms(questions_of_run(rows), config.out / ENTROPY_PLOT):
        plots.append(ENTROPY_PLOT)
    summary["plots"] = plots
    atomic_write_json(config.out / SUMMARY, summary)
    atomic_write_text(config.out / REPORT, render_report(summary, plots))


# ----------------------------------------------------------------------------- sweep


def paired_questions(
    never_rows: Sequence[Mapping[str, Any]],
    always_rows: Sequence[Mapping[str, Any]],
    metric: str = "em",
) -> list[Question]:
    """Questions answered in both runs: entropy of the first query (from the `never` run,
    else the `always` run), correctness self-filled and searched."""
    never = {str(r["id"]): r for r in never_rows if r.get("error") is None}
    always = {str(r["id"]): r for r in always_rows if r.get("error") is None}
    out = []
    for qid, r in never.items():
        a = always.get(qid)
        if a is None:
            continue
        out.append(
            Question(
                id=qid,
                entropy=r.get("entropy") or a.get("entropy"),
                correct_internal=outcome(r, metric),
                correct_external=outcome(a, metric),
            )
        )
    return out


# The call rate (a share of always-search's calls) of the report's verdict line.
VERDICT_RATE = 0.5


def curve_table(
    points: Sequence[CurvePoint],
    stats: Sequence[PointStats],
    rates: Sequence[float] = TABLE_RATES,
) -> list[str]:
    """Markdown for one aggregate: per target call rate, the point reached, its accuracy,
    random routing at the same rate, the gain, each with its 95 % bootstrap interval."""
    lines = [
        "| call rate ≤ | rate reached | tau | accuracy [95 %] | random routing at that rate [95 %] "
        "| gain over random [95 %] | beyond random |",
        "|---:|---:|---:|---|---|---|---|",
    ]
    seen: set[int] = set()
    for rate in rates:
        p = choose_for_call_rate(points, rate)
        k = list(points).index(p)
        st = stats[k]
        again = " (same point)" if k in seen else ""
        seen.add(k)
        lines.append(
            f"| {rate:.1f} | {p.call_rate:.2f} | {p.threshold:.4g} | "
            f"{_fmt_ci(st.accuracy, st.accuracy_interval)} | {_fmt_ci(st.random, st.random_interval)} | "
            f"{_fmt_ci(st.gain, st.gain_interval)} | {'yes' if st.beats_random else 'no'}{again} |"
        )
    return lines


def verdict_line(agg: str, verdict: Mapping[str, Any], acc_always: float | None) -> str:
    """One plain sentence: at VERDICT_RATE of always-search's calls, what share of its
    accuracy the signal keeps, and whether that is beyond random routing."""
    share = verdict.get("share_of_always")
    rnd = verdict.get("random_share_of_always")
    iv = verdict["accuracy_interval"]
    if share is None:
        kept = f"always-search scores {_fmt(acc_always)}, so no share of it can be given"
    else:
        kept = (
            f"keeps {share:.0%} of always-search's accuracy "
            f"({verdict['accuracy']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] of {acc_always:.3f}; "
            f"random routing keeps {rnd:.0%})"
        )
    gain = verdict["gain_interval"]
    if verdict["beats_random"]:
        beyond = "beyond random routing (the gain's 95 % interval is above 0)"
    elif verdict.get("questions", MIN_SIGNAL_QUESTIONS) < MIN_SIGNAL_QUESTIONS:
        beyond = f"NOT beyond random routing (fewer than {MIN_SIGNAL_QUESTIONS} questions: no claim)"
    else:
        beyond = (
            f"NOT beyond random routing (the gain's 95 % interval [{gain['low']:.3f}, {gain['high']:.3f}] "
            "is not above 0)"
        )
    return (
        f"- **{AGGREGATE_LABELS[agg]}**: at {verdict['target_call_rate']:.0%} of always-search's calls "
        f"(rate reached {verdict['call_rate']:.2f}) it {kept}: {beyond}."
    )


@dataclass
class SweepStats:
    """Curves, their bootstrap statistics and the runs' intervals of a set of paired questions."""

    curves: dict[str, list[CurvePoint]]
    stats: dict[str, list[PointStats]]
    intervals: dict[str, Interval]


def sweep_stats(questions: Sequence[Question]) -> SweepStats:
    curves = {a: threshold_curve(questions, a) for a in AGGREGATES}
    if not questions:
        return SweepStats(curves, {}, {})
    weights = bootstrap_weights(len(questions))
    stats = {a: curve_stats(questions, pts, weights=weights) for a, pts in curves.items() if pts}
    return SweepStats(curves, stats, run_intervals(questions, weights=weights))


def sweep_summary(
    questions: Sequence[Question],
    never: Mapping[str, Any],
    always: Mapping[str, Any],
    computed: SweepStats | None = None,
) -> dict[str, Any]:
    acc_int, acc_ext = run_accuracies(questions)
    sw = computed if computed is not None else sweep_stats(questions)

    def curve(agg: str) -> list[dict[str, Any]]:
        out = [p.to_dict() for p in sw.curves[agg]]
        for d, st in zip(out, sw.stats.get(agg) or [], strict=False):
            d.update(st.to_dict())
        return out

    return {
        "kind": "sweep",
        "paired_questions": len(questions),
        "with_entropy": sum(1 for q in questions if q.entropy is not None),
        "accuracy_never": acc_int,
        "accuracy_always": acc_ext,
        "accuracy_intervals": {k: v.to_dict() for k, v in sw.intervals.items()},
        "ssrl_rule": ssrl_rule_point(acc_ext),
        "auroc_wrong_self_fill": {a: aggregate_auroc(questions, a) for a in AGGREGATES},
        "auroc_counts": {a: auroc_detail(questions, a) for a in AGGREGATES},
        "verdict": {a: verdict_at_rate(sw.curves[a], sw.stats[a], acc_ext, VERDICT_RATE) for a in sw.stats},
        "curves": {a: curve(a) for a in sw.curves},
        "never": {
            k: never.get(k) for k in ("em", "f1", "external_call_rate", "errors", "scored", "latency_s")
        },
        "always": {
            k: always.get(k) for k in ("em", "f1", "external_call_rate", "errors", "scored", "latency_s")
        },
        "finished_at": _now(),
    }


def _branch_lines(branches: Mapping[str, int] | None) -> list[str]:
    if not branches:
        return []
    return [
        f"Exact counterfactuals: one self-filled trajectory per question (`{BRANCHED}/`); at its first "
        "search the server also ran the branch that searched externally from the identical prefix "
        f"(same query, same entropy). Branched: {branches['branched']}; no search: "
        f"{branches['no_search']} and search failed: {branches['failed']} (both sides are then the "
        "trajectory itself).",
        "",
    ]


def render_sweep_report(summary: Mapping[str, Any], computed: SweepStats, plots: Sequence[str]) -> str:
    acc_ext = summary["accuracy_always"]
    iv = summary.get("accuracy_intervals") or {}
    n = summary["paired_questions"]
    lines = [
        "# ssrl eval sweep: accuracy against external-call rate",
        "",
        f"N = {n} questions answered by both runs (policy `never` in `never/`, "
        f"`always` in `always/`); {summary['with_entropy']} with a recorded first-query entropy. "
        "Intervals are 95 % percentile-bootstrap intervals over these questions (1000 resamples, "
        "fixed seed; docs/evaluation.md).",
        "",
        *_branch_lines(summary.get("branches")),
        "| run | exact match | exact match on the paired questions [95 %] | external-call rate | mean latency (s) |",
        "|---|---|---|---|---|",
        f"| never (self-filled) | {_fmt(summary['never']['em'])} | "
        f"{_fmt_ci(summary['accuracy_never'], iv.get('never'))} | {_fmt(summary['never']['external_call_rate'])} | "
        f"{_fmt((summary['never']['latency_s'] or {}).get('mean'), 2)} |",
        f"| always (external) | {_fmt(summary['always']['em'])} | "
        f"{_fmt_ci(summary['accuracy_always'], iv.get('always'))} | {_fmt(summary['always']['external_call_rate'])} | "
        f"{_fmt((summary['always']['latency_s'] or {}).get('mean'), 2)} |",
        "",
        "### Verdict",
        "",
    ]
    if summary.get("verdict"):
        lines += [verdict_line(a, v, acc_ext) for a, v in summary["verdict"].items()]
    else:
        lines.append("- No curve: no question was answered by both runs with a recorded entropy.")
    lines += [
        "",
        "### Entropy of the first query as a predictor of a wrong self-filled answer",
        "",
        *auroc_table(summary.get("auroc_counts") or {}),
        "",
        "### Threshold curves",
        "",
        "Counterfactual accuracy of a threshold policy: a question is routed external when its "
        "first query's uncertainty is above tau and takes the `always` run's outcome, else the "
        "`never` run's. Random routing at the same call rate r is computed per question from the "
        "two runs ((1 - r) * never + r * always for a question with a search) and resampled "
        "together with the point, so the gain's interval is paired. SSRL's rule (first search "
        f"always external) is the point call rate 1.0, accuracy {_fmt(acc_ext)}.",
    ]
    for agg in AGGREGATES:
        if computed.stats.get(agg):
            lines += [
                "",
                f"#### {AGGREGATE_LABELS[agg]}",
                "",
                *curve_table(computed.curves[agg], computed.stats[agg]),
            ]
    if plots:
        lines += ["", "### Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_sweep(
    out: Path,
    never_rows: Sequence[Mapping[str, Any]],
    always_rows: Sequence[Mapping[str, Any]],
    never: Mapping[str, Any],
    always: Mapping[str, Any],
    plots_enabled: bool,
    branches: BranchCounts | None = None,
) -> dict[str, Any]:
    questions = paired_questions(never_rows, always_rows)
    computed = sweep_stats(questions)
    summary = sweep_summary(questions, never, always, computed)
    if branches is not None:
        summary["branches"] = branches.to_dict()
    plots: list[str] = []
    acc_int, acc_ext = summary["accuracy_never"], summary["accuracy_always"]
    if (
        plots_enabled
        and acc_int is not None
        and acc_ext is not None
        and summary["with_entropy"]
        and plot_curves(
            computed.curves,
            acc_int,
            acc_ext,
            out / CURVE_PLOT,
            stats=computed.stats,
            intervals=computed.intervals,
            questions=len(questions),
        )
    ):
        plots.append(CURVE_PLOT)
    if plots_enabled and plot_entropy_histograms(questions, out / ENTROPY_PLOT):
        plots.append(ENTROPY_PLOT)
    summary["plots"] = plots
    atomic_write_json(out / SUMMARY, summary)
    atomic_write_text(out / REPORT, render_sweep_report(summary, computed, plots))
    return summary


# The sweep's one run: policy `never` with exact counterfactual branches (`OUT/branched`).
BRANCHED = "branched"


@dataclass
class BranchCounts:
    """How the `always` side of a sweep was obtained, per question."""

    branched: int = 0
    # No (non-empty) search: searching could change nothing; both sides are the trajectory.
    no_search: int = 0
    # The branch's search failed: it would have self-filled too; both sides are the trajectory.
    failed: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"branched": self.branched, "no_search": self.no_search, "failed": self.failed}


def branch_rows(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], BranchCounts]:
    """A branched run's rows as the `never` rows (the self-filled trajectory) and the `always`
    rows (its branch that searched externally at the first search, from the identical prefix:
    the same query and the same entropy by construction)."""
    never: list[dict[str, Any]] = []
    always: list[dict[str, Any]] = []
    counts = BranchCounts()
    for row in rows:
        if row.get("error") is not None:
            continue
        never.append(dict(row))
        branches = (row.get("trace") or {}).get("counterfactuals") or []
        first = branches[0] if branches else None
        if first is None or first.get("error"):
            counts.no_search += first is None
            counts.failed += first is not None
            always.append({**row, "branch": first})
            continue
        counts.branched += 1
        answer = str(first.get("answer") or "")
        gold = list(row["gold"])
        always.append(
            {
                **row,
                "answer": answer,
                "answers": [answer],
                "correct": best_exact_match(answer, gold),
                "f1": best_f1(answer, gold),
                "n_correct": int(best_exact_match(answer, gold)),
                "reasoning": None,
                "first_route": "external",
                "external_calls": 1,
                "internal_fills": max(0, int(row.get("internal_fills") or 0) - 1),
                "repetitive": is_repetitive(answer),
                "inserted_titles": inserted_titles([first.get("search") or {}]),
                "branch": first,
            }
        )
    return never, always, counts


def run_sweep(config: EvalConfig) -> dict[str, Any]:
    """One self-filled run with exact counterfactual branches, split into `never` and `always`
    runs of the same questions, then the counterfactual curves."""
    branched = config.for_policy("never", config.out / BRANCHED)
    branched.self_search = {**branched.self_search, "counterfactual": True}
    run_eval(branched)
    config.model = branched.model
    selected = {q["id"] for q in load_questions(config.data, config.limit, config.shuffle, config.seed)}
    rows = [
        r
        for r in final_rows(ResultsFile(config.out / BRANCHED / RESULTS).read()).values()
        if r["id"] in selected
    ]
    never_rows, always_rows, counts = branch_rows(rows)
    results: dict[str, dict[str, Any]] = {}
    for policy, side in (("never", never_rows), ("always", always_rows)):
        sub = config.for_policy(policy, config.out / policy)
        sub.model = config.model
        sub.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(sub.out / RESULTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in side))
        atomic_write_json(sub.out / CONFIG, {**sub.to_json(), "derived_from": BRANCHED})
        summary = summarize(side, len(selected), sub)
        write_outputs(sub, summary, side)
        results[policy] = summary
    return write_sweep(
        config.out, never_rows, always_rows, results["never"], results["always"], config.plots, counts
    )


# ----------------------------------------------------------------------------- calibrate


@dataclass
class LoadedRun:
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def policy(self) -> str | None:
        return (self.config.get("self_search") or {}).get("policy")


def load_run(path: Path) -> LoadedRun:
    path = Path(path)
    results = path / RESULTS
    if not results.is_file():
        raise EvalError(f"{path} has no {RESULTS}: not an `ssrl eval` run directory")
    config_path = path / CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    rows = list(final_rows(ResultsFile(results).read()).values())
    return LoadedRun(path, config, rows)


# `ssrl calibrate`'s exit status when the chosen point does not beat random routing.
EXIT_NO_SIGNAL = 3


def calibration_inputs(paths: Sequence[Path], metric: str = "em") -> tuple[list[Question], str]:
    """Paired questions for calibration from a sweep directory or a `never` and an `always` run.

    A single run is refused: its self-filled and searched halves are different questions, so
    they cannot stand in for the never and always outcomes of the same questions.
    """
    if len(paths) == 1 and all((Path(paths[0]) / p / RESULTS).is_file() for p in SWEEP_POLICIES):
        paths = [Path(paths[0]) / p for p in SWEEP_POLICIES]
    runs = [load_run(p) for p in paths]
    if len(runs) == 1:
        run = runs[0]
        raise EvalError(
            f"{run.path} is a single run (policy {run.policy or 'server default'}); calibration "
            "needs the real never and always outcomes of the same questions: run "
            "`ssrl eval --sweep` (or one run with --policy never and one with --policy always) "
            "and pass the sweep directory or both run directories"
        )
    if len(runs) != 2:
        raise EvalError("give a sweep directory, or a `never` and an `always` run")
    by_policy = {r.policy: r for r in runs}
    if set(by_policy) != set(SWEEP_POLICIES):
        found = ", ".join(str(r.policy) for r in runs)
        raise EvalError(f"two runs must be one with policy `never` and one with `always` (found: {found})")
    never, always = by_policy["never"], by_policy["always"]
    questions = paired_questions(never.rows, always.rows, metric)
    if not questions:
        raise EvalError("the two runs have no question answered in both")
    return questions, f"counterfactual pair (never: {never.path}, always: {always.path})"


def render_calibration(
    cal: Calibration, source: str, metric: str = "em", questions: int | None = None
) -> str:
    p = cal.point
    label = METRIC_LABELS[metric]
    target = (
        f"external-call rate ≤ {cal.target_value:g}"
        if cal.target == "call_rate"
        else f"accuracy loss ≤ {cal.target_value:g} against always-search"
    )
    signal = cal.signal
    lines = [
        f"Calibrated from {source}" + (f", N = {questions} paired questions." if questions else "."),
        f"Target: {target}.",
        f"Chosen: aggregate {cal.aggregate}, tau {p.threshold:.6g} -> call rate {p.call_rate:.3f} "
        f"({p.calls}/{p.searches} first searches)"
        + (
            f", counterfactual {label} {_fmt_ci(signal.accuracy, signal.accuracy_interval)}"
            if signal is not None
            else ""
        ),
    ]
    iv = cal.run_intervals
    lines.append(
        f"Reference: never {_fmt_ci(cal.accuracy_internal, iv.get('never'))}, "
        f"always {_fmt_ci(cal.accuracy_external, iv.get('always'))}, "
        f"SSRL rule (rate 1.0) {_fmt(cal.accuracy_external)}."
    )
    if signal is not None:
        lines.append(
            f"Random routing at this rate: {_fmt_ci(signal.random, signal.random_interval)}; "
            f"gain over it {_fmt_ci(signal.gain, signal.gain_interval)} "
            f"(95 % bootstrap intervals, paired) -> "
            + (
                "beats random routing."
                if signal.beats_random
                else "does NOT beat random routing: no signal"
                + (
                    f" (fewer than {MIN_SIGNAL_QUESTIONS} questions)."
                    if signal.questions < MIN_SIGNAL_QUESTIONS
                    else "."
                )
            )
        )
    lines += ["", "AUROC of each aggregate for a wrong self-filled answer (with class counts):"]
    for agg in AGGREGATES:
        lines.append(f"  {AGGREGATE_LABELS[agg]:<26} {_fmt_auroc(cal.auroc_counts.get(agg))}")
    if cal.stats:
        lines += ["", f"At {VERDICT_RATE:.0%} of always-search's calls:"]
        for agg, stats in cal.stats.items():
            verdict = verdict_at_rate(cal.curves[agg], stats, cal.accuracy_external, VERDICT_RATE)
            lines.append("  " + verdict_line(agg, verdict, cal.accuracy_external)[2:].replace("**", ""))
    curve = cal.curves[cal.aggregate]
    stats_of = dict(zip((id(q) for q in curve), cal.stats.get(cal.aggregate) or [], strict=False))
    shown = list(curve)
    if len(curve) > 25:  # the whole curve is in calibration.json; print it at round rates
        picked = {id(choose_for_call_rate(curve, r)): choose_for_call_rate(curve, r) for r in TABLE_RATES}
        picked[id(p)] = p
        shown = sorted(picked.values(), key=lambda q: -q.call_rate)
    lines += [
        "",
        f"Curve of {cal.aggregate} (tau in the server's units"
        + (f"; {len(shown)} of {len(curve)} points" if len(shown) < len(curve) else "")
        + "; [95 % bootstrap intervals]):",
        f"  {'tau':>12}  {'call rate':>9}  {'calls':>7}  {'accuracy':<22}  {'random routing':<22}  beyond",
    ]
    for point in shown:
        mark = "  <- chosen" if point == p else ""
        st = stats_of.get(id(point))
        acc = _fmt_ci(st.accuracy, st.accuracy_interval) if st else _fmt(point.accuracy)
        rnd = _fmt_ci(st.random, st.random_interval) if st else "–"
        beyond = ("yes" if st.beats_random else "no") if st else "–"
        lines.append(
            f"  {point.threshold:>12.6g}  {point.call_rate:>9.3f}  {point.calls:>7}  "
            f"{acc:<22}  {rnd:<22}  {beyond:<6}{mark}"
        )
    return "\n".join(lines)


def emit(text: str, file: Any = None) -> bool:
    """Print `text`; False when the reader went away (`| head -1`): stdout is then pointed at
    /dev/null so that the interpreter's final flush does not raise again."""
    stream = file if file is not None else sys.stdout
    try:
        print(text, file=stream)
        stream.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        return False
    return True


def cmd_calibrate(args: Mapping[str, Any]) -> int:
    """Choose the threshold; write calibration.json (always) and calibration.env, then print.

    Files come first, so a closed stdout (`| head -1`) cannot lose them. When the chosen
    point does not beat random routing at its call rate beyond the 95 % interval of the
    gain, calibration.env is written without a threshold (`SSRL_CALIBRATION_SIGNAL=none`)
    and the exit status is EXIT_NO_SIGNAL.
    """
    paths = [Path(p) for p in args["runs"]]
    target_rate = args.get("target_call_rate")
    max_loss = args.get("max_accuracy_loss")
    if target_rate is None and max_loss is None:
        target_rate = 0.3
    try:
        metric = args.get("metric") or "em"
        questions, source = calibration_inputs(paths, metric)
        cal = calibrate(
            questions,
            target_call_rate=target_rate,
            max_accuracy_loss=max_loss,
            aggregate=args.get("aggregate"),
        )
    except (EvalError, ValueError) as exc:
        print(f"ssrl calibrate: {exc}", file=sys.stderr)
        return 2
    out = Path(args.get("out") or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    signal = cal.signal
    comments = [
        f"written by `ssrl calibrate` on {_now()} from {source}, N = {len(questions)} questions",
        f"target {cal.target} {cal.target_value:g}; aggregate {cal.aggregate}, call rate "
        f"{cal.point.call_rate:.3f}"
        + (
            f", counterfactual {METRIC_LABELS[metric]} {_fmt_ci(signal.accuracy, signal.accuracy_interval)}"
            f" vs random routing {_fmt_ci(signal.random, signal.random_interval)}"
            if signal is not None
            else ""
        ),
    ]
    if cal.beats_random:
        comments.append(
            "use: set -a; . ./calibration.env; set +a; ssrl serve   (or docker run --env-file calibration.env)"
        )
        env_text = render_env(cal.aggregate, cal.threshold, comments)
    else:
        env_text = render_no_signal_env(comments)
    data = {
        **cal.to_dict(),
        "metric": metric,
        "source": source,
        "questions": len(questions),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95},
        "written_at": _now(),
    }
    if not cal.beats_random:
        data["threshold"] = None
        data["refused"] = "the chosen point does not beat random routing at the same call rate"
    atomic_write_json(out / CALIBRATION_JSON, data)
    atomic_write_text(out / CALIBRATION_ENV, env_text)
    if not args.get("no_plots") and cal.accuracy_internal is not None and cal.accuracy_external is not None:
        plot_curves(
            cal.curves,
            cal.accuracy_internal,
            cal.accuracy_external,
            out / CALIBRATION_PLOT,
            cal.point,
            ylabel=METRIC_LABELS[metric],
            stats=cal.stats,
            intervals=cal.run_intervals,
            questions=len(questions),
        )
    text = render_calibration(cal, source, metric, len(questions))
    # A closed stdout (`| head -1`) is no failure: the files are written, the status stands.
    emit(text + f"\n\nwrote {out / CALIBRATION_ENV} and {out / CALIBRATION_JSON}")
    if not cal.beats_random:
        print(
            f"ssrl calibrate: no signal: {cal.aggregate} at call rate {cal.point.call_rate:.3f} does not beat "
            "random routing at the same rate beyond the 95 % interval; calibration.env holds no "
            "threshold (SSRL_CALIBRATION_SIGNAL=none). More questions, or another --metric or "
            "target, may show a signal.",
            file=sys.stderr,
        )
        return EXIT_NO_SIGNAL
    return 0


# ----------------------------------------------------------------------------- eval command


def config_from_args(args: Mapping[str, Any]) -> EvalConfig:
    self_search = {
        key: args[key]
        for key in ("mode", "policy", "threshold", "aggregate", "max_turns", "docs_per_search")
        if args.get(key) is not None
    }
    api_key = args.get("api_key")
    if api_key is None:
        env = os.environ.get("SSRL_API_KEY", "")
        api_key = env.split(",")[0].strip() or None
    if args["n"] < 1:
        raise EvalError("--n must be at least 1")
    if args["concurrency"] < 1:
        raise EvalError("--concurrency must be at least 1")
    return EvalConfig(
        base_url=normalise_base_url(args["base_url"]),
        api_key=api_key,
        model=args.get("model"),
        data=resolve_data(args["data"]),
        out=Path(args["out"]),
        concurrency=args["concurrency"],
        limit=args.get("limit"),
        seed=args.get("seed"),
        shuffle=bool(args.get("shuffle")),
        n=args["n"],
        temperature=args.get("temperature"),
        max_tokens=args.get("max_tokens"),
        self_search=self_search,
        timeout_s=args["timeout"],
        progress=not args.get("no_progress"),
        plots=not args.get("no_plots"),
    )


def print_summary(summary: Mapping[str, Any], out: Path) -> None:
    lines = []
    if summary.get("kind") == "sweep":
        iv = summary.get("accuracy_intervals") or {}
        lines.append(
            f"sweep: never EM {_fmt_ci(summary['accuracy_never'], iv.get('never'))}, always EM "
            f"{_fmt_ci(summary['accuracy_always'], iv.get('always'))} over {summary['paired_questions']} "
            "questions [95 % bootstrap intervals]"
        )
        counts = summary.get("auroc_counts") or {}
        for agg in summary["auroc_wrong_self_fill"]:
            lines.append(f"  AUROC {AGGREGATE_LABELS[agg]:<26} {_fmt_auroc(counts.get(agg))}")
        for agg, verdict in (summary.get("verdict") or {}).items():
            lines.append("  " + verdict_line(agg, verdict, summary["accuracy_always"])[2:].replace("**", ""))
    else:
        lat = summary["latency_s"]
        lines.append(
            f"EM {_fmt_ci(summary['em'], summary.get('em_interval'))}  "
            f"F1 {_fmt_ci(summary['f1'], summary.get('f1_interval'))}  scored {summary['scored']}  "
            f"errors {summary['errors']}  external-call rate {_fmt(summary['external_call_rate'])}  "
            f"latency p50 {_fmt(lat['p50'], 2)} s p99 {_fmt(lat['p99'], 2)} s"
        )
        if "pass_at_k" in summary:
            lines.append(
                "pass@k "
                + "  ".join(f"{k}:{v:.3f}" for k, v in summary["pass_at_k"].items())
                + f"  majority {_fmt(summary['majority_accuracy'])}"
            )
    lines.append(f"wrote {out / SUMMARY} and {out / REPORT}")
    emit("\n".join(lines))  # the files are written: a closed stdout loses nothing


def cmd_eval(args: Mapping[str, Any]) -> int:
    try:
        config = config_from_args(args)
        if args.get("sweep"):
            if config.self_search.get("policy") is not None:
                raise EvalError("--sweep runs policies never and always itself; drop --policy")
            if config.n != 1:
                raise EvalError("--sweep pairs one trajectory per question: use --n 1")
            if config.effective_temperature > 0:
                print(
                    "ssrl eval: warning: --sweep at temperature > 0 may write different first "
                    "queries in the two runs; the counterfactual assumes the same",
                    file=sys.stderr,
                )
            summary = run_sweep(config)
        else:
            summary = run_eval(config)
    except EvalError as exc:
        print(f"ssrl eval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nssrl eval: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print_summary(summary, config.out)
    return 0


def register(subparsers: Any) -> None:
    """Add `eval` and `calibrate` to an `ssrl` parser."""
    register_eval(subparsers)
    register_calibrate(subparsers)


def register_eval(subparsers: Any) -> None:
    """Add `ssrl eval` (see clients.cli for the protocol)."""
    ev = subparsers.add_parser(
        "eval",
        help="Score a QA set against a running server (EM, F1, pass@k, search calls).",
        description="Run a question set ({id, question, answers} JSONL) against a running ssrl "
        "server. Interrupted runs resume: questions with a row without error are skipped.",
    )
    ev.add_argument(
        "--data",
        required=True,
        help="Question JSONL, `dev` (the set built from the default offline index by `ssrl devset "
        "build`, built on first use), or the name of a set in ../shared/data/qa (e.g. nq_open_dev).",
    )
    ev.add_argument("--out", required=True, help="Run directory (created; reused to resume).")
    ev.add_argument("--base-url", default="http://127.0.0.1:8000", help="Server URL (with or without /v1).")
    ev.add_argument("--api-key", default=None, help="Bearer key (default: first of SSRL_API_KEY).")
    ev.add_argument("--model", default=None, help="Model name (default: the server's first model).")
    ev.add_argument("--concurrency", type=int, default=8, help="Requests in flight (default 8).")
    ev.add_argument("--limit", type=int, default=None, help="Only the first N questions.")
    ev.add_argument(
        "--shuffle", action="store_true", help="Shuffle the questions with --seed before --limit."
    )
    ev.add_argument("--seed", type=int, default=None, help="Sampling seed sent with each request.")
    ev.add_argument("--n", type=int, default=1, help="Samples per question (request n); pass@k for k=1..n.")
    ev.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="Sampling temperature (default 0 with --n 1, 0.7 with --n > 1).",
    )
    ev.add_argument("--max-tokens", type=int, default=None, help="Token budget of each trajectory.")
    ev.add_argument("--mode", choices=["native", "guided"], default=None, help="self_search.mode")
    ev.add_argument(
        "--policy",
        default=None,
        metavar="POLICY",
        help=f"self_search.policy: {', '.join(get_args(Policy))}, or one a server plugin adds.",
    )
    ev.add_argument("--threshold", type=float, default=None, help="self_search.threshold")
    ev.add_argument("--aggregate", choices=AGGREGATES, default=None, help="self_search.aggregate")
    ev.add_argument("--max-turns", type=int, default=None, help="self_search.max_turns")
    ev.add_argument("--docs-per-search", type=int, default=None, help="self_search.docs_per_search")
    ev.add_argument(
        "--sweep",
        action="store_true",
        help="Run policies never and always into OUT/never and OUT/always, then the "
        "counterfactual accuracy/call-rate curves of every threshold.",
    )
    ev.add_argument("--timeout", type=float, default=600.0, help="Seconds per request (default 600).")
    ev.add_argument("--no-progress", action="store_true", help="No progress bar.")
    ev.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    ev.set_defaults(handler=cmd_eval)


def register_calibrate(subparsers: Any) -> None:
    """Add `ssrl calibrate` (see clients.cli for the protocol)."""
    cal = subparsers.add_parser(
        "calibrate",
        help="Choose the routing threshold from eval runs; write calibration.env.",
        description="From a sweep directory, or a `never` and an `always` run of the same "
        "questions, choose the threshold and aggregate, print the curve with 95 %% bootstrap "
        "intervals, and write calibration.env (SSRL_SEARCH_* lines for `ssrl serve`). When the "
        "chosen point does not beat random routing at the same call rate, calibration.env gets "
        f"SSRL_CALIBRATION_SIGNAL=none and no threshold, and the exit status is {EXIT_NO_SIGNAL}.",
    )
    cal.add_argument("runs", nargs="+", help="Run directories (a sweep dir, or never + always).")
    target = cal.add_mutually_exclusive_group()
    target.add_argument(
        "--target-call-rate",
        type=float,
        default=None,
        help="Highest external-call rate allowed (default 0.3).",
    )
    target.add_argument(
        "--max-accuracy-loss",
        type=float,
        default=None,
        help="Largest exact-match loss against always-search allowed (needs both runs).",
    )
    cal.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default=None,
        help="Aggregate to calibrate (default: the best one for the target).",
    )
    cal.add_argument(
        "--metric",
        choices=METRICS,
        default="em",
        help="Outcome per question: exact match (default) or F1 (a softer signal when "
        "few answers are exactly right; 'wrong' for the AUROC is then F1 < 0.5).",
    )
    cal.add_argument(
        "--out", default=None, help="Where to write calibration.env/.json (default: the first run dir)."
    )
    cal.add_argument("--no-plots", action="store_true", help="Skip the PNG plot.")
    cal.set_defaults(handler=cmd_calibrate)


__all__ = [
    "EvalConfig",
    "EvalError",
    "ResultsFile",
    "calibration_inputs",
    "cmd_calibrate",
    "cmd_eval",
    "final_rows",
    "load_questions",
    "paired_questions",
    "register",
    "register_calibrate",
    "register_eval",
    "run_eval",
    "run_eval_async",
    "run_sweep",
    "score_response",
    "summarize",
]
