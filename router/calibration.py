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

**Honest statistics.** Every curve point carries a bootstrap 95 % interval of its accuracy
and the accuracy of random routing at the same call rate, computed from the real never and
always outcomes of each question (a question with a search counts
(1 - r) * c_int + r * c_ext, one without keeps c_int, as the threshold point does), with the
interval of the paired difference point - random over the same resamples (`PointStats`). A
point *beats random* when that difference's interval lies above 0 and it rests on at least
MIN_SIGNAL_QUESTIONS questions. `calibrate` needs both
runs: a single run's internally and externally routed halves are different questions, not
counterfactual outcomes of the same ones.

Pure functions, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from router.entropy import AGGREGATES, check_aggregate
from router.scoring import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    Interval,
    auroc,
    bootstrap_weights,
    mean,
    percentile_interval,
)

# Fewest paired questions on which a point may be said to beat random routing: below it the
# percentile bootstrap is too optimistic (5 questions whose differences are all >= 0 give an
# interval above 0 in 99 % of resamples, while a sign test on them gives p = 1/8).
MIN_SIGNAL_QUESTIONS: Final = 20

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


def _auroc_inputs(questions: Sequence[Question], aggregate: str) -> tuple[list[float], list[bool]]:
    check_aggregate(aggregate)
    scores: list[float] = []
    wrong: list[bool] = []
    for q in questions:
        if q.entropy is None or q.correct_internal is None:
            continue
        scores.append(uncertainty(q.entropy, aggregate))
        wrong.append(q.correct_internal < 0.5)
    return scores, wrong


def auroc_detail(questions: Sequence[Question], aggregate: str) -> dict[str, Any]:
    """The AUROC of `aggregate_auroc` with its class counts, and why it is None when it is.

    {"auroc", "positives" (wrong self-filled answers), "negatives" (right ones), "reason"}:
    an AUROC from one positive among 60 is a statement about one question, and the counts
    beside it say so.
    """
    scores, wrong = _auroc_inputs(questions, aggregate)
    positives = sum(wrong)
    negatives = len(wrong) - positives
    reason = None
    if not scores:
        reason = "no question with a search and a self-filled outcome"
    elif positives == 0:
        reason = "no wrong self-filled answer (every one is right)"
    elif negatives == 0:
        reason = "no right self-filled answer (every one is wrong)"
    return {
        "auroc": auroc(scores, wrong) if reason is None else None,
        "positives": positives,
        "negatives": negatives,
        "reason": reason,
    }


def aggregate_auroc(questions: Sequence[Question], aggregate: str) -> float | None:
    """AUROC of the aggregate's uncertainty for predicting that the self-filled answer is
    wrong (positive = wrong), over questions with a search and a self-filled outcome.

    With several samples per question, a question counts as wrong when less than half of
    its samples were right. None when undefined (no self-filled run, or one class only).
    """
    scores, wrong = _auroc_inputs(questions, aggregate)
    if not scores:
        return None
    return auroc(scores, wrong)


@dataclass(frozen=True, slots=True)
class PointStats:
    """A curve point against random routing at the same call rate, with bootstrap intervals.

    `gain` is accuracy - random; its interval comes from the same resamples (paired), so
    `beats_random` (the interval's low end above 0, on at least MIN_SIGNAL_QUESTIONS
    questions) accounts for both being estimated on the same questions.
    """

    questions: int
    accuracy: float
    accuracy_interval: Interval
    random: float
    random_interval: Interval
    gain: float
    gain_interval: Interval

    @property
    def beats_random(self) -> bool:
        return self.questions >= MIN_SIGNAL_QUESTIONS and self.gain_interval.low > _EPS

    def to_dict(self) -> dict[str, Any]:
        return {
            "questions": self.questions,
            "accuracy": self.accuracy,
            "accuracy_interval": self.accuracy_interval.to_dict(),
            "random_routing_accuracy": self.random,
            "random_routing_interval": self.random_interval.to_dict(),
            "gain_over_random": self.gain,
            "gain_interval": self.gain_interval.to_dict(),
            "beats_random": self.beats_random,
        }


def _require_pair(questions: Sequence[Question]) -> None:
    if not _has_pair(questions):
        raise ValueError(
            "needs both runs: one with policy `never` and one with `always` on the same "
            "questions (a single run's self-filled and searched halves are different "
            "questions, not counterfactual outcomes)"
        )


def run_intervals(
    questions: Sequence[Question],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    weights: Sequence[Sequence[int]] | None = None,
) -> dict[str, Interval]:
    """Bootstrap intervals of the never and always runs' accuracies ({"never", "always"})."""
    _require_pair(questions)
    if weights is None:
        weights = bootstrap_weights(len(questions), resamples, seed)
    n = len(questions)
    out = {}
    for name, values in (
        ("never", [float(q.correct_internal or 0.0) for q in questions]),
        ("always", [float(q.correct_external or 0.0) for q in questions]),
    ):
        means = [math.fsum(w * v for w, v in zip(ws, values, strict=True)) / n for ws in weights]
        out[name] = percentile_interval(means, level)
    return out


def curve_stats(
    questions: Sequence[Question],
    points: Sequence[CurvePoint],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    weights: Sequence[Sequence[int]] | None = None,
) -> list[PointStats]:
    """`PointStats` for each point of one aggregate's curve (needs both runs).

    One set of resamples of the questions (random.Random(seed)) serves every point, so the
    intervals are reproducible and consecutive points comparable. Cost O(resamples *
    questions) per curve: consecutive points differ in a few questions' routes, and each
    resample's total is updated for those only. `weights` (`bootstrap_weights(len(questions),
    resamples, seed)`) may be passed to share the resamples between curves.
    """
    _require_pair(questions)
    n = len(questions)
    if weights is None:
        weights = bootstrap_weights(n, resamples, seed)
    c_int = [float(q.correct_internal) for q in questions]  # type: ignore[arg-type]
    c_ext = [float(q.correct_external) for q in questions]  # type: ignore[arg-type]
    searched = [q.entropy is not None for q in questions]
    base = [math.fsum(w * v for w, v in zip(ws, c_int, strict=True)) for ws in weights]
    delta = [
        math.fsum(w * (e - i) for w, e, i, s in zip(ws, c_ext, c_int, searched, strict=True) if s)
        for ws in weights
    ]
    base0 = math.fsum(c_int)
    delta0 = math.fsum(e - i for e, i, s in zip(c_ext, c_int, searched, strict=True) if s)
    totals = list(base)  # every question self-filled to start with
    current = list(c_int)
    out: list[PointStats] = []
    for point in points:
        for k, q in enumerate(questions):
            external = q.entropy is not None and routes_external(q.entropy, point.aggregate, point.threshold)
            value = c_ext[k] if external else c_int[k]
            if value != current[k]:
                change = value - current[k]
                for b, ws in enumerate(weights):
                    if ws[k]:
                        totals[b] += ws[k] * change
                current[k] = value
        rate = point.call_rate
        accs = [t / n for t in totals]
        randoms = [(b0 + rate * d) / n for b0, d in zip(base, delta, strict=True)]
        gains = [a - r for a, r in zip(accs, randoms, strict=True)]
        accuracy = math.fsum(current) / n
        random_acc = (base0 + rate * delta0) / n
        out.append(
            PointStats(
                questions=n,
                accuracy=accuracy,
                accuracy_interval=percentile_interval(accs, level),
                random=random_acc,
                random_interval=percentile_interval(randoms, level),
                gain=accuracy - random_acc,
                gain_interval=percentile_interval(gains, level),
            )
        )
    return out


def verdict_at_rate(
    points: Sequence[CurvePoint],
    stats: Sequence[PointStats],
    acc_always: float | None,
    rate: float = 0.5,
) -> dict[str, Any]:
    """At `rate` of always-search's calls: the point used, the share of always-search's
    accuracy it keeps (and random routing's), and whether it beats random."""
    point = choose_for_call_rate(points, rate)
    st = stats[list(points).index(point)]
    share = random_share = None
    if acc_always:
        share = st.accuracy / acc_always
        random_share = st.random / acc_always
    return {
        "target_call_rate": rate,
        "call_rate": point.call_rate,
        "threshold": point.threshold,
        "accuracy": st.accuracy,
        "accuracy_interval": st.accuracy_interval.to_dict(),
        "share_of_always": share,
        "random_share_of_always": random_share,
        "beats_random": st.beats_random,
        "gain_interval": st.gain_interval.to_dict(),
        "questions": st.questions,
    }


@dataclass(frozen=True)
class Calibration:
    """A chosen threshold, how it was chosen, and whether it beats random routing."""

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
    # AUROC with class counts per aggregate (`auroc_detail`).
    auroc_counts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # PointStats per point of each curve, and intervals of the never/always accuracies.
    stats: dict[str, list[PointStats]] = field(default_factory=dict)
    run_intervals: dict[str, Interval] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return self.point.threshold

    @property
    def signal(self) -> PointStats | None:
        """The chosen point's statistics (None when not computed)."""
        stats = self.stats.get(self.aggregate)
        if not stats:
            return None
        return stats[self.curves[self.aggregate].index(self.point)]

    @property
    def beats_random(self) -> bool:
        """Whether the chosen point beats random routing at its call rate beyond the interval."""
        signal = self.signal
        return signal is not None and signal.beats_random

    def to_dict(self) -> dict[str, Any]:
        acc_int, acc_ext = self.accuracy_internal, self.accuracy_external
        random = None
        if acc_int is not None and acc_ext is not None:
            random = random_routing_accuracy(self.point.call_rate, acc_ext, acc_int)
        signal = self.signal
        if signal is not None:
            random = signal.random

        def curve(name: str) -> list[dict[str, Any]]:
            pts = [p.to_dict() for p in self.curves[name]]
            for d, st in zip(pts, self.stats.get(name) or [], strict=False):
                d.update(st.to_dict())
            return pts

        return {
            "policy": "threshold",
            "aggregate": self.aggregate,
            "threshold": self.threshold,
            "target": self.target,
            "target_value": self.target_value,
            "chosen": self.point.to_dict(),
            "signal": "beats_random" if self.beats_random else "none",
            "chosen_stats": signal.to_dict() if signal is not None else None,
            "accuracy_never": acc_int,
            "accuracy_always": acc_ext,
            "accuracy_intervals": {k: v.to_dict() for k, v in self.run_intervals.items()},
            "random_routing_accuracy_at_chosen_rate": random,
            "ssrl_rule": ssrl_rule_point(acc_ext),
            "auroc_wrong_self_fill": dict(self.auroc),
            "auroc_counts": dict(self.auroc_counts),
            "curves": {a: curve(a) for a in self.curves},
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
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Calibration:
    """Choose an aggregate and a threshold for one target (exactly one must be given).

    With `aggregate` None the best aggregate is picked: at a call-rate target the one with
    the highest counterfactual accuracy at its chosen point; at an accuracy-loss target the
    one with the lowest call rate (ties: higher accuracy). Remaining ties go to the order of
    `aggregates`. With both runs (never and always) on every question the result carries
    bootstrap statistics (`resamples`, `seed`); whether to use the threshold is the caller's
    call: see `Calibration.beats_random`.

    Without both runs only a call-rate target is possible (a cut of the entropies, as the
    routing benchmark needs; the aggregate with the highest AUROC, else the first): no
    accuracy, no run accuracies (a single run's routed halves are not the never and always
    outcomes of the same questions), no statistics, and `beats_random` is False. `ssrl
    calibrate` refuses single runs altogether.
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
    acc_int, acc_ext = run_accuracies(questions) if paired else (None, None)
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
            _require_pair(questions)
        assert acc_ext is not None
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
        auroc_counts={name: auroc_detail(questions, name) for name in curves},
        **_statistics(questions, curves, resamples, seed),
    )


def _statistics(
    questions: Sequence[Question], curves: Mapping[str, Sequence[CurvePoint]], resamples: int, seed: int
) -> dict[str, Any]:
    """Calibration's `stats` and `run_intervals` (empty without both runs)."""
    if not _has_pair(questions):
        return {"stats": {}, "run_intervals": {}}
    weights = bootstrap_weights(len(questions), resamples, seed)
    return {
        "stats": {name: curve_stats(questions, pts, weights=weights) for name, pts in curves.items()},
        "run_intervals": run_intervals(questions, weights=weights),
    }


def render_no_signal_env(comments: Sequence[str] = ()) -> str:
    """The env file written when the chosen point does not beat random routing.

    No policy and no threshold (the server keeps its defaults), a comment saying why, and
    `SSRL_CALIBRATION_SIGNAL=none` (the server ignores it; scripts can test it).
    """
    lines = [f"# {c}" for c in comments]
    lines += [
        "# no signal: the chosen threshold does not beat random routing at the same call rate",
        "# beyond its 95 % bootstrap interval, so no threshold is written",
        "SSRL_CALIBRATION_SIGNAL=none",
    ]
    return "\n".join(lines) + "\n"


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
