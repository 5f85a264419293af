"""Calibrating the routing threshold: curves of external-call rate against accuracy.

Routing decides, per search query, between a real (external) search and letting the model
write the information itself (internal). A threshold tau on one aggregate of the query's
token entropies (see `router.entropy`) sets how often search is called. This module answers
"which tau?" from evaluation runs, without re-running the model per threshold.

**Counterfactual curve.** Run the same questions twice, once with policy `never` (every search
self-filled) and once with `always` (every search external), at temperature 0 so that the
model writes the same first query in both runs (the query comes before the routing decision).
For each question we then know its first query's uncertainty u, and whether it was answered
right when self-filled (c_int) and when searched (c_ext). A threshold routes the question
external when u is above it, so its accuracy is

    acc(tau) = mean over questions of (c_ext if u > tau else c_int)

and its external-call rate is the share of questions with u > tau. Sweeping tau over every
cut between observed values traces the whole curve. Random routing at call rate p scores
p * acc_ext + (1 - p) * acc_int in expectation. SSRL's rule (first search of a trajectory
always external) is the point (1, acc_ext) for single-search trajectories. The curve uses the
first search of each trajectory only; later searches of multi-search trajectories are not
modelled.

**Orientation.** `uncertainty(entropy, aggregate)` is oriented so that higher is more
uncertain: the entropies and SSRL's term as they are, the lowest token probability flipped
to 1 - min_prob. Curves are computed on that oriented scale; `CurvePoint.threshold` is the
tau in the server's own units (`--search-threshold`: nats, or for min_prob a probability the
lowest token probability must fall below), and each point's routing is re-checked with the
server's exact comparison (`router.policies.exceeds`), so a written threshold reproduces
the point's call rate.

Pure functions, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from router.entropy import AGGREGATES, check_aggregate
from router.scoring import auroc, mean

# Tolerance when comparing rates and accuracies against targets (float sums of 0/1 values).
_EPS: Final = 1e-9


def uncertainty(entropy: Mapping[str, Any], aggregate: str) -> float:
    """The query's uncertainty under `aggregate`, higher = more uncertain (1 - min_prob)."""
    check_aggregate(aggregate)
    value = float(entropy[aggregate])
    return 1.0 - value if aggregate == "min_prob" else value


def server_threshold(aggregate: str, cutoff: float) -> float:
    """The server's tau for an oriented cutoff (external when uncertainty > cutoff).

    For min_prob the server routes external when min_prob < tau, i.e. 1 - min_prob > 1 - tau,
    so tau = 1 - cutoff, clamped to [0, 1] (the server only accepts a probability there).
    """
    check_aggregate(aggregate)
    if aggregate == "min_prob":
        return min(1.0, max(0.0, 1.0 - cutoff))
    return cutoff


def routes_external(entropy: Mapping[str, Any], aggregate: str, threshold: float) -> bool:
    """The server's decision for policy `threshold` (mirrors `router.policies.exceeds`)."""
    value = float(entropy[aggregate])
    return value < threshold if aggregate == "min_prob" else value > threshold


@dataclass(frozen=True, slots=True)
class Question:
    """One question's first search, as calibration needs it.

    `entropy` is the trace's entropy record of the first search ({mean, max, min_prob, ssrl,
    ...}), None when the trajectory made no (non-empty) search: such a question never calls
    search whatever the threshold. `correct_internal` / `correct_external` are its accuracy
    (0..1; the share of samples right when there are several) with the search self-filled /
    searched; None where the run is not available.
    """

    id: str
    entropy: Mapping[str, Any] | None
    correct_internal: float | None = None
    correct_external: float | None = None


@dataclass(frozen=True, slots=True)
class CurvePoint:
    aggregate: str
    # tau in the server's units (what `--search-threshold` / `self_search.threshold` take).
    threshold: float
    # The same cut on the oriented scale: external when uncertainty > cutoff.
    cutoff: float
    calls: int
    searches: int
    # calls / searches (0 when no question searched).
    call_rate: float
    # Counterfactual accuracy; None without both runs.
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "aggregate": self.aggregate,
            "threshold": self.threshold,
            "cutoff": self.cutoff,
            "calls": self.calls,
            "searches": self.searches,
            "call_rate": self.call_rate,
            "accuracy": self.accuracy,
        }


def cutoffs(values: Sequence[float]) -> list[float]:
    """Oriented cut points that realise every distinct split of `values`.

    One below the minimum (everything external), the midpoint between each pair of
    consecutive distinct values, and the maximum itself (nothing external: the comparison is
    strict). Midpoints keep the chosen threshold away from the observed values, so a value
    that moves slightly between runs does not flip its route.
    """
    distinct = sorted(set(values))
    if not distinct:
        return []
    gaps = [b - a for a, b in itertools.pairwise(distinct)]
    step = min(gaps) if gaps else 1.0
    below = distinct[0] - max(step / 2, 1e-6)
    mids = [(a + b) / 2 for a, b in itertools.pairwise(distinct)]
    return [below, *mids, distinct[-1]]


def _has_pair(questions: Sequence[Question]) -> bool:
    return bool(questions) and all(
        q.correct_internal is not None and q.correct_external is not None for q in questions
    )


def _point(questions: Sequence[Question], aggregate: str, cutoff: float, paired: bool) -> CurvePoint:
    threshold = server_threshold(aggregate, cutoff)
    calls = searches = 0
    total = 0.0
    for q in questions:
        external = False
        if q.entropy is not None:
            searches += 1
            external = routes_external(q.entropy, aggregate, threshold)
            calls += external
        if paired:
            value = q.correct_external if external else q.correct_internal
            total += float(value)  # type: ignore[arg-type]
    return CurvePoint(
        aggregate=aggregate,
        threshold=threshold,
        cutoff=cutoff,
        calls=calls,
        searches=searches,
        call_rate=calls / searches if searches else 0.0,
        accuracy=total / len(questions) if paired else None,
    )


def threshold_curve(questions: Sequence[Question], aggregate: str) -> list[CurvePoint]:
    """Call rate (and, with both runs, counterfactual accuracy) at every distinct cut.

    Points come in order of decreasing call rate (increasing threshold on the oriented scale);
    points that route identically (possible after min_prob's clamping) are merged.
    """
    check_aggregate(aggregate)
    paired = _has_pair(questions)
    values = [uncertainty(q.entropy, aggregate) for q in questions if q.entropy is not None]
    points: list[CurvePoint] = []
    for cut in cutoffs(values):
        point = _point(questions, aggregate, cut, paired)
        if points and points[-1].calls == point.calls and points[-1].threshold == point.threshold:
            continue
        points.append(point)
    return points


def random_routing_accuracy(call_rate: float, acc_external: float, acc_internal: float) -> float:
    """Expected accuracy when each search goes external with probability `call_rate`."""
    if not 0.0 <= call_rate <= 1.0:
        raise ValueError(f"call_rate must be in [0, 1], got {call_rate}")
    return call_rate * acc_external + (1.0 - call_rate) * acc_internal


def run_accuracies(questions: Sequence[Question]) -> tuple[float | None, float | None]:
    """(accuracy self-filled, accuracy searched) over the questions, None where missing."""
    internal = [q.correct_internal for q in questions if q.correct_internal is not None]
    external = [q.correct_external for q in questions if q.correct_external is not None]
    return mean(internal), mean(external)


def choose_for_call_rate(points: Sequence[CurvePoint], target: float) -> CurvePoint:
    """The point with the highest call rate not above `target` (ties: the higher accuracy).

    The curve always holds a point with no call at all, so there is always an answer.
    """
    if not points:
        raise ValueError("no curve points: no question has a recorded search entropy")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target call rate must be in [0, 1], got {target}")
    eligible = [p for p in points if p.call_rate <= target + _EPS]
    if not eligible:
        eligible = [min(points, key=lambda p: p.call_rate)]
    return max(eligible, key=lambda p: (p.call_rate, p.accuracy or 0.0))


def choose_for_accuracy_loss(points: Sequence[CurvePoint], reference: float, max_loss: float) -> CurvePoint:
    """The point with the lowest call rate whose accuracy is at least `reference - max_loss`.

    `reference` is the accuracy with every search external (the always-search run). Ties on
    call rate go to the higher accuracy. Needs counterfactual accuracies (both runs).
    """
    if not points:
        raise ValueError("no curve points: no question has a recorded search entropy")
    if any(p.accuracy is None for p in points):
        raise ValueError("an accuracy target needs both a `never` and an `always` run")
    if max_loss < 0:
        raise ValueError(f"max_loss must not be negative, got {max_loss}")
    floor = reference - max_loss - _EPS
    eligible = [p for p in points if p.accuracy is not None and p.accuracy >= floor]
    if not eligible:
        # Not even routing everything external reaches it (min_prob clamping): the best point.
        eligible = [max(points, key=lambda p: (p.accuracy or 0.0, -p.call_rate))]
    return min(eligible, key=lambda p: (p.call_rate, -(p.accuracy or 0.0)))


def aggregate_auroc(questions: Sequence[Question], aggregate: str) -> float | None:
    """AUROC of the aggregate's uncertainty for predicting that the self-filled answer is
    wrong (positive = wrong), over questions with a search and a self-filled outcome.

    With several samples per question, a question counts as wrong when less than half of
    its samples were right. None when undefined (no self-filled run, or one class only).
    """
    check_aggregate(aggregate)
    scores: list[float] = []
    wrong: list[bool] = []
    for q in questions:
        if q.entropy is None or q.correct_internal is None:
            continue
        scores.append(uncertainty(q.entropy, aggregate))
        wrong.append(q.correct_internal < 0.5)
    if not scores:
        return None
    return auroc(scores, wrong)


@dataclass(frozen=True)
class Calibration:
    """A chosen threshold and how it was chosen."""

    aggregate: str
    point: CurvePoint
    # "call_rate" or "accuracy_loss", and the target value.
    target: str
    target_value: float
    # Accuracy of the never / always runs (None where missing).
    accuracy_internal: float | None
    accuracy_external: float | None
    auroc: dict[str, float | None] = field(default_factory=dict)
    curves: dict[str, list[CurvePoint]] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return self.point.threshold

    def to_dict(self) -> dict[str, Any]:
        acc_int, acc_ext = self.accuracy_internal, self.accuracy_external
        random = None
        if acc_int is not None and acc_ext is not None:
            random = random_routing_accuracy(self.point.call_rate, acc_ext, acc_int)
        return {
            "policy": "threshold",
            "aggregate": self.aggregate,
            "threshold": self.threshold,
            "target": self.target,
            "target_value": self.target_value,
            "chosen": self.point.to_dict(),
            "accuracy_never": acc_int,
            "accuracy_always": acc_ext,
            "random_routing_accuracy_at_chosen_rate": random,
            "ssrl_rule": ssrl_rule_point(acc_ext),
            "auroc_wrong_self_fill": dict(self.auroc),
            "curves": {a: [p.to_dict() for p in pts] for a, pts in self.curves.items()},
        }


def ssrl_rule_point(acc_external: float | None) -> dict[str, float | None]:
    """SSRL's rule on single-search trajectories: the first search is always external."""
    return {"call_rate": 1.0, "accuracy": acc_external}


def calibrate(
    questions: Sequence[Question],
    *,
    target_call_rate: float | None = None,
    max_accuracy_loss: float | None = None,
    aggregate: str | None = None,
    aggregates: Sequence[str] = AGGREGATES,
) -> Calibration:
    """Choose an aggregate and a threshold for one target (exactly one must be given).

    With `aggregate` None the best aggregate is picked: at a call-rate target the one with
    the highest counterfactual accuracy at its chosen point (without both runs: the highest
    AUROC, else `mean`); at an accuracy-loss target the one with the lowest call rate
    (ties: higher accuracy). Remaining ties go to the order of `aggregates`.
    """
    if (target_call_rate is None) == (max_accuracy_loss is None):
        raise ValueError("give exactly one of target_call_rate and max_accuracy_loss")
    if aggregate is not None:
        check_aggregate(aggregate)
    for name in aggregates:
        check_aggregate(name)
    if not any(q.entropy is not None for q in questions):
        raise ValueError("no question has a recorded search entropy to calibrate on")
    paired = _has_pair(questions)
    acc_int, acc_ext = run_accuracies(questions)
    names = [aggregate] if aggregate is not None else list(aggregates)
    curves = {name: threshold_curve(questions, name) for name in aggregates}
    if aggregate is not None and aggregate not in curves:
        curves[aggregate] = threshold_curve(questions, aggregate)
    aurocs = {name: aggregate_auroc(questions, name) for name in curves}

    chosen: dict[str, CurvePoint] = {}
    if target_call_rate is not None:
        target, value = "call_rate", target_call_rate
        for name in names:
            chosen[name] = choose_for_call_rate(curves[name], target_call_rate)

        def rank(name: str) -> tuple[float, ...]:
            p = chosen[name]
            if paired:
                return (p.accuracy or 0.0, -p.call_rate)
            score = aurocs.get(name)
            return (score if score is not None else -1.0,)
    else:
        assert max_accuracy_loss is not None
        if not paired or acc_ext is None:
            raise ValueError(
                "a maximum accuracy loss needs both runs: one with policy `never` and one "
                "with `always` on the same questions"
            )
        target, value = "accuracy_loss", max_accuracy_loss
        for name in names:
            chosen[name] = choose_for_accuracy_loss(curves[name], acc_ext, max_accuracy_loss)

        def rank(name: str) -> tuple[float, ...]:
            p = chosen[name]
            return (-p.call_rate, p.accuracy or 0.0)

    best = names[0]
    for name in names[1:]:
        if rank(name) > rank(best):
            best = name
    return Calibration(
        aggregate=best,
        point=chosen[best],
        target=target,
        target_value=value,
        accuracy_internal=acc_int,
        accuracy_external=acc_ext,
        auroc=aurocs,
        curves=curves,
    )


def render_env(aggregate: str, threshold: float, comments: Sequence[str] = ()) -> str:
    """An env file `ssrl serve` reads (`set -a; . calibration.env`, or docker `--env-file`).

    Plain `NAME=value` lines, no quotes and no `export`, which both shells and docker parse.
    The threshold is written with `repr`, so it reads back as exactly the same float.
    """
    check_aggregate(aggregate)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    lines = [f"# {c}" for c in comments]
    lines += [
        "SSRL_SEARCH_POLICY=threshold",
        f"SSRL_SEARCH_AGGREGATE={aggregate}",
        f"SSRL_SEARCH_THRESHOLD={float(threshold)!r}",
    ]
    return "\n".join(lines) + "\n"
