"""router.calibration: threshold curves, counterfactual accuracy, choosing tau, env output."""

from __future__ import annotations

import subprocess

import pytest

from router.calibration import (
    MIN_SIGNAL_QUESTIONS,
    Question,
    aggregate_auroc,
    auroc_detail,
    calibrate,
    choose_for_accuracy_loss,
    choose_for_call_rate,
    curve_stats,
    cutoffs,
    random_routing_accuracy,
    render_env,
    render_no_signal_env,
    run_accuracies,
    run_intervals,
    server_threshold,
    threshold_curve,
    uncertainty,
    verdict_at_rate,
)
from router.entropy import QueryEntropy
from router.policies import SearchContext, ThresholdPolicy


def entropy(mean: float, max_: float | None = None, min_prob: float = 0.5, ssrl: float = 0.2) -> dict:
    return {
        "mean": mean,
        "max": mean if max_ is None else max_,
        "min_prob": min_prob,
        "ssrl": ssrl,
        "tokens": 3,
        "kind": "topk_lower_bound",
    }


# Ten self-filled questions: the three most uncertain (top 30%) are exactly the wrong ones.
RIGHT_MEANS = [0.10, 0.15, 0.20, 0.30, 0.35, 0.50, 0.70]
WRONG_MEANS = [2.00, 2.50, 3.00]


def separated() -> list[Question]:
    qs = [
        Question(f"r{i}", entropy(m, min_prob=0.9 - i * 0.01), correct_internal=1.0)
        for i, m in enumerate(RIGHT_MEANS)
    ]
    qs += [
        Question(f"w{i}", entropy(m, min_prob=0.1 + i * 0.01), correct_internal=0.0)
        for i, m in enumerate(WRONG_MEANS)
    ]
    return qs


def test_uncertainty_is_oriented_higher_is_more_uncertain():
    e = entropy(1.2, max_=2.0, min_prob=0.3, ssrl=0.4)
    assert uncertainty(e, "mean") == 1.2
    assert uncertainty(e, "max") == 2.0
    assert uncertainty(e, "min_prob") == pytest.approx(0.7)
    assert uncertainty(e, "ssrl") == 0.4
    with pytest.raises(ValueError):
        uncertainty(e, "median")


def test_cutoffs_cover_every_split():
    assert cutoffs([]) == []
    cuts = cutoffs([0.5, 0.1, 0.5, 0.3])
    assert cuts[0] < 0.1
    assert cuts[1:] == pytest.approx([0.2, 0.4, 0.5])
    single = cutoffs([2.0])
    assert single[0] < 2.0 and single[-1] == 2.0


def test_call_rate_target_puts_tau_between_the_groups():
    qs = separated()
    curve = threshold_curve(qs, "mean")
    assert [p.call_rate for p in curve] == sorted((p.call_rate for p in curve), reverse=True)
    assert curve[0].call_rate == 1.0 and curve[-1].call_rate == 0.0
    chosen = choose_for_call_rate(curve, 0.3)
    assert chosen.call_rate == pytest.approx(0.3)
    assert max(RIGHT_MEANS) < chosen.threshold < min(WRONG_MEANS)
    # A target between two achievable rates never overshoots.
    assert choose_for_call_rate(curve, 0.35).call_rate == pytest.approx(0.3)
    assert choose_for_call_rate(curve, 0.0).calls == 0


def test_min_prob_threshold_is_a_probability_in_the_servers_direction():
    qs = separated()
    chosen = choose_for_call_rate(threshold_curve(qs, "min_prob"), 0.3)
    assert chosen.call_rate == pytest.approx(0.3)
    wrong_min_probs = [q.entropy["min_prob"] for q in qs if q.correct_internal == 0]
    right_min_probs = [q.entropy["min_prob"] for q in qs if q.correct_internal == 1]
    # external when min_prob < tau: above every wrong one, below every right one
    assert max(wrong_min_probs) < chosen.threshold < min(right_min_probs)
    assert server_threshold("min_prob", -0.5) == 1.0 and server_threshold("min_prob", 1.5) == 0.0


@pytest.mark.parametrize("aggregate", ["mean", "max", "min_prob", "ssrl"])
def test_curve_routing_agrees_with_the_servers_threshold_policy(aggregate):
    qs = [
        Question(str(i), entropy(0.1 * i, max_=0.3 * (9 - i), min_prob=0.05 * i + 0.1, ssrl=0.02 * (i % 4)))
        for i in range(10)
    ]
    for point in threshold_curve(qs, aggregate):
        policy = ThresholdPolicy(point.threshold, aggregate)
        routed = 0
        for q in qs:
            e = q.entropy
            qe = QueryEntropy(
                mean=e["mean"],
                max=e["max"],
                min_prob=e["min_prob"],
                ssrl=e["ssrl"],
                tokens=3,
                kind="topk_lower_bound",
            )
            ctx = SearchContext(index=0, entropy=qe, previous=(), external_calls=0, max_external_calls=None)
            routed += policy.decide(ctx).route == "external"
        assert routed == point.calls


def test_auroc_perfect_random_and_tied():
    qs = separated()
    assert aggregate_auroc(qs, "mean") == 1.0
    assert aggregate_auroc(qs, "min_prob") == 1.0  # via 1 - min_prob
    # scores 1..4 with wrong at 1 and 4: half the pairs ordered each way
    mixed = [
        Question(str(i), entropy(float(v)), correct_internal=c)
        for i, (v, c) in enumerate([(1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0)])
    ]
    assert aggregate_auroc(mixed, "mean") == 0.5
    tied = [Question(str(i), entropy(1.0), correct_internal=float(i % 2)) for i in range(6)]
    assert aggregate_auroc(tied, "mean") == 0.5
    # no self-filled outcome, or one class only: undefined
    assert aggregate_auroc([Question("a", entropy(1.0), correct_external=1.0)], "mean") is None
    assert (
        aggregate_auroc([Question(str(i), entropy(i), correct_internal=1.0) for i in range(3)], "mean")
        is None
    )


def pair() -> list[Question]:
    # (uncertainty, right when self-filled, right when searched)
    rows = [(0.1, 1, 1), (0.5, 0, 1), (0.9, 1, 0), (1.5, 0, 1)]
    return [
        Question(f"q{i}", entropy(u), correct_internal=float(ci), correct_external=float(ce))
        for i, (u, ci, ce) in enumerate(rows)
    ]


def test_counterfactual_curve_on_a_tiny_pair():
    qs = pair()
    assert run_accuracies(qs) == (0.5, 0.75)
    curve = threshold_curve(qs, "mean")
    got = [(p.call_rate, p.accuracy) for p in curve]
    assert got == [(1.0, 0.75), (0.75, 0.75), (0.5, 0.5), (0.25, 0.75), (0.0, 0.5)]
    assert [p.threshold for p in curve[1:]] == pytest.approx([0.3, 0.7, 1.2, 1.5])
    # the cheapest point without loss against always-search routes only q3 (u=1.5)
    best = choose_for_accuracy_loss(curve, reference=0.75, max_loss=0.0)
    assert (best.call_rate, best.accuracy, best.threshold) == (0.25, 0.75, pytest.approx(1.2))
    assert choose_for_accuracy_loss(curve, reference=0.75, max_loss=0.3).call_rate == 0.0
    assert random_routing_accuracy(0.5, 0.75, 0.5) == pytest.approx(0.625)
    with pytest.raises(ValueError):
        random_routing_accuracy(1.5, 0.75, 0.5)


def test_questions_without_a_search_never_call_and_keep_their_self_filled_outcome():
    qs = [*pair(), Question("none", None, correct_internal=1.0, correct_external=0.0)]
    curve = threshold_curve(qs, "mean")
    assert curve[0].searches == 4 and curve[0].calls == 4 and curve[0].call_rate == 1.0
    assert curve[0].accuracy == pytest.approx((3 + 1) / 5)


def test_calibrate_picks_the_best_aggregate_and_rejects_bad_targets():
    qs = pair()
    # swap in a useless aggregate: max is the reverse of mean
    qs = [
        Question(q.id, {**q.entropy, "max": 10 - q.entropy["mean"]}, q.correct_internal, q.correct_external)
        for q in qs
    ]
    cal = calibrate(qs, max_accuracy_loss=0.0)
    # min_prob and ssrl are constant here (they keep accuracy only at rate 1.0), max is
    # reversed (rate 0.5): mean reaches always-search accuracy at rate 0.25
    assert cal.aggregate == "mean" and cal.point.call_rate == 0.25
    assert cal.to_dict()["chosen"]["call_rate"] == 0.25
    at_rate = calibrate(qs, target_call_rate=0.3)
    assert at_rate.aggregate == "mean" and at_rate.point.accuracy == 0.75
    forced = calibrate(qs, target_call_rate=0.3, aggregate="max")
    assert forced.aggregate == "max" and forced.point.accuracy == 0.5
    with pytest.raises(ValueError):
        calibrate(qs)
    with pytest.raises(ValueError):
        calibrate(qs, target_call_rate=0.3, max_accuracy_loss=0.1)
    single = [Question(q.id, q.entropy, correct_internal=q.correct_internal) for q in qs]
    with pytest.raises(ValueError, match="both runs"):
        calibrate(single, max_accuracy_loss=0.02)
    with pytest.raises(ValueError, match="entropy"):
        calibrate([Question("x", None, 1.0, 1.0)], target_call_rate=0.3)


def test_calibrate_single_run_cuts_entropies_but_claims_nothing():
    # a call-rate target on one run's entropies (what the routing benchmark needs) works ...
    cal = calibrate(separated(), target_call_rate=0.3)
    assert cal.aggregate == "mean" and cal.point.call_rate == pytest.approx(0.3)
    assert max(RIGHT_MEANS) < cal.threshold < min(WRONG_MEANS)
    # ... but a single run's self-filled half is not the never outcome of the searched half:
    # no accuracy, no reference runs, no statistics, no signal
    assert cal.point.accuracy is None
    assert cal.accuracy_internal is None and cal.accuracy_external is None
    assert cal.stats == {} and cal.signal is None and not cal.beats_random
    data = cal.to_dict()
    assert data["signal"] == "none" and data["random_routing_accuracy_at_chosen_rate"] is None
    half = [
        Question(q.id, q.entropy, correct_external=1.0) if i % 2 else q for i, q in enumerate(separated())
    ]
    assert calibrate(half, target_call_rate=0.3).accuracy_external is None
    with pytest.raises(ValueError, match="both runs"):
        calibrate(separated(), max_accuracy_loss=0.02)
    with pytest.raises(ValueError, match="both runs"):
        curve_stats(separated(), threshold_curve(separated(), "mean"))


def test_auroc_detail_gives_class_counts_and_why_it_is_undefined():
    assert auroc_detail(separated(), "mean") == {"auroc": 1.0, "positives": 3, "negatives": 7, "reason": None}
    # one wrong answer among 60: defined, but the counts say what it rests on
    one = [Question(str(i), entropy(float(i)), correct_internal=float(i < 59)) for i in range(60)]
    assert auroc_detail(one, "mean") == {"auroc": 1.0, "positives": 1, "negatives": 59, "reason": None}
    every_right = [Question(str(i), entropy(float(i)), correct_internal=1.0) for i in range(5)]
    detail = auroc_detail(every_right, "mean")
    assert detail["auroc"] is None and detail["positives"] == 0 and detail["negatives"] == 5
    assert "no wrong" in detail["reason"]
    every_wrong = [Question(str(i), entropy(float(i)), correct_internal=0.0) for i in range(5)]
    assert "no right" in auroc_detail(every_wrong, "mean")["reason"]
    assert auroc_detail([Question("a", None, 1.0, 1.0)], "mean")["reason"].startswith("no question")


def signal(n_uncertain: int = 20, n_sure: int = 60) -> list[Question]:
    """The n_uncertain most uncertain are wrong self-filled and right searched; the rest are
    right either way except every 6th, right only self-filled."""
    qs = []
    for i in range(n_sure + n_uncertain):
        uncertain = i >= n_sure
        qs.append(
            Question(
                f"q{i}",
                entropy(i / 10),
                correct_internal=float(not uncertain),
                correct_external=float(uncertain or i % 6 != 0),
            )
        )
    return qs


def all_zero(n: int = 60) -> list[Question]:
    return [Question(f"q{i}", entropy(i / 10), correct_internal=0.0, correct_external=0.0) for i in range(n)]


def test_curve_stats_random_routing_intervals_and_reproducibility():
    qs = signal()
    acc_int, acc_ext = run_accuracies(qs)
    curve = threshold_curve(qs, "mean")
    stats = curve_stats(qs, curve)
    assert len(stats) == len(curve)
    for point, st in zip(curve, stats, strict=True):
        assert st.questions == 80
        assert st.accuracy == pytest.approx(point.accuracy)
        assert st.accuracy_interval.low <= st.accuracy <= st.accuracy_interval.high
        # every question searches: random routing is (1 - r) * never + r * always
        assert st.random == pytest.approx(random_routing_accuracy(point.call_rate, acc_ext, acc_int))
        assert st.random_interval.low <= st.random <= st.random_interval.high
        assert st.gain == pytest.approx(st.accuracy - st.random)
    # the ends are random routing itself: no gain, a zero-width gain interval
    assert stats[0].gain == pytest.approx(0.0) and stats[-1].gain == pytest.approx(0.0)
    assert not stats[0].beats_random and not stats[-1].beats_random
    # routing the 20 uncertain ones (rate 0.25) is perfect, far beyond random
    quarter = stats[[p.call_rate for p in curve].index(0.25)]
    assert quarter.accuracy == 1.0 and quarter.beats_random and quarter.gain_interval.low > 0.1
    # fixed seed: the same intervals every time; another seed: other (close) ones
    assert curve_stats(qs, curve) == stats
    assert curve_stats(qs, curve, seed=1) != stats
    # the never/always intervals
    runs = run_intervals(qs)
    assert runs["never"].low <= acc_int <= runs["never"].high
    assert runs["always"].low <= acc_ext <= runs["always"].high


def test_curve_stats_incremental_totals_match_a_direct_bootstrap():
    from router.scoring import bootstrap_mean

    qs = pair() * 3
    curve = threshold_curve(qs, "mean")
    stats = curve_stats(qs, curve, resamples=200, seed=5)
    for point, st in zip(curve, stats, strict=True):
        values = [
            (q.correct_external if q.entropy["mean"] > point.threshold else q.correct_internal) for q in qs
        ]
        assert bootstrap_mean(values, resamples=200, seed=5) == pytest.approx(st.accuracy_interval)


def test_questions_without_a_search_count_self_filled_in_random_routing():
    qs = [*pair(), Question("none", None, correct_internal=1.0, correct_external=0.0)]
    curve = threshold_curve(qs, "mean")
    stats = curve_stats(qs, curve)
    # at rate 1 the four searching questions take `always` (3 right), the fifth keeps 1
    assert stats[0].random == pytest.approx(4 / 5) and stats[0].accuracy == pytest.approx(4 / 5)


def test_calibrate_accepts_a_point_beyond_random():
    cal = calibrate(signal(), target_call_rate=0.25, aggregate="mean")
    assert cal.point.call_rate == 0.25 and cal.point.accuracy == 1.0
    assert cal.beats_random and cal.signal is not None and cal.signal.gain_interval.low > 0
    assert 5.9 < cal.threshold < 6.0
    data = cal.to_dict()
    assert data["signal"] == "beats_random" and data["chosen_stats"]["beats_random"] is True
    assert data["auroc_counts"]["mean"]["positives"] == 20
    assert data["curves"]["mean"][0]["accuracy_interval"]["low"] <= data["curves"]["mean"][0]["accuracy"]
    assert set(data["accuracy_intervals"]) == {"never", "always"}


def test_calibrate_marks_no_signal_when_every_point_scores_zero():
    # every answer wrong: the AUROC is undefined and no point can beat random routing
    cal = calibrate(all_zero(), target_call_rate=0.3, aggregate="mean")
    assert not cal.beats_random and cal.to_dict()["signal"] == "none"
    assert cal.auroc_counts["mean"]["auroc"] is None and "no right" in cal.auroc_counts["mean"]["reason"]
    # a real but weak signal on few questions is not claimed either
    small = calibrate(signal(n_uncertain=3, n_sure=4), target_call_rate=0.5, aggregate="mean")
    assert small.point.accuracy == 1.0 and small.signal is not None and small.signal.gain > 0
    assert small.signal.questions < MIN_SIGNAL_QUESTIONS and not small.beats_random


def test_verdict_at_half_of_always_search():
    qs = signal()
    curve = threshold_curve(qs, "mean")
    verdict = verdict_at_rate(curve, curve_stats(qs, curve), run_accuracies(qs)[1], 0.5)
    assert verdict["call_rate"] == 0.5 and verdict["beats_random"] is True
    assert verdict["share_of_always"] == pytest.approx(verdict["accuracy"] / (70 / 80))
    assert verdict["random_share_of_always"] < verdict["share_of_always"]
    zero = all_zero()
    curve = threshold_curve(zero, "mean")
    verdict = verdict_at_rate(curve, curve_stats(zero, curve), 0.0, 0.5)
    assert verdict["share_of_always"] is None and verdict["beats_random"] is False


def test_no_signal_env_writes_no_threshold(tmp_path):
    from server.settings import ServeSettings

    path = tmp_path / "calibration.env"
    text = render_no_signal_env(["a comment"])
    path.write_text(text)
    lines = text.splitlines()
    assert "SSRL_CALIBRATION_SIGNAL=none" in lines and "# a comment" in lines
    assert not any(line.startswith("SSRL_SEARCH_") for line in lines)
    # the server ignores the marker and keeps its defaults
    assert ServeSettings(_env_file=str(path)).search_policy == ServeSettings().search_policy


def test_env_file_is_read_by_the_server_settings_and_by_a_shell(tmp_path):
    from server.settings import ServeSettings

    path = tmp_path / "calibration.env"
    path.write_text(render_env("max", 1.2345678901234567, ["a comment"]))
    settings = ServeSettings(_env_file=str(path))
    assert settings.search_threshold == 1.2345678901234567
    assert settings.search_aggregate == "max"
    assert settings.search_policy == "threshold"
    shell = subprocess.run(
        ["bash", "-c", f"set -a; . '{path}'; echo $SSRL_SEARCH_AGGREGATE $SSRL_SEARCH_THRESHOLD"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.split() == ["max", "1.2345678901234567"]
    with pytest.raises(ValueError):
        render_env("median", 1.0)
    with pytest.raises(ValueError):
        render_env("mean", float("inf"))
