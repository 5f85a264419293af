"""Entropy bounds from top-k logprobs, checked against full distributions."""

from __future__ import annotations

import math
import random

import pytest

from router.engine.base import TokenLogprobs
from router.entropy import (
    AGGREGATES,
    DEFAULT_ESTIMATOR,
    EMPTY_QUERY_ENTROPY,
    ESTIMATORS,
    QueryEntropy,
    query_entropy,
    ssrl_sampled_term,
    token_entropy,
)


def log_softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    z = m + math.log(math.fsum(math.exp(x - m) for x in logits))
    return [x - z for x in logits]


def shannon(logprobs: list[float]) -> float:
    return -math.fsum(math.exp(lp) * lp for lp in logprobs if lp > -math.inf)


def position(logprobs: list[float], sampled: int, k: int | None = None) -> TokenLogprobs:
    """A position whose `top` holds the k most likely tokens (all when k is None)."""
    order = sorted(range(len(logprobs)), key=lambda i: logprobs[i], reverse=True)
    keep = order if k is None else order[:k]
    top = {i: logprobs[i] for i in keep}
    return TokenLogprobs(token_id=sampled, logprob=logprobs[sampled], top=top)


LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.3, 1.7]


def test_full_distribution_is_exact() -> None:
    lps = log_softmax(LOGITS)
    e = token_entropy(position(lps, sampled=1), vocab_size=len(lps))
    assert e.kind == "exact"
    assert e.value == pytest.approx(shannon(lps), abs=1e-9)
    assert e.lower == e.value
    assert e.upper == pytest.approx(e.value, abs=1e-9)
    assert e.leftover_mass <= 1e-6
    assert e.sampled_prob == pytest.approx(math.exp(lps[1]))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_bounds_contain_true_entropy(k: int) -> None:
    lps = log_softmax(LOGITS)
    true_h = shannon(lps)
    e = token_entropy(position(lps, sampled=0, k=k), vocab_size=len(lps), estimator="lower")
    assert e.kind == "topk_lower_bound"
    assert e.upper is not None
    assert e.lower <= true_h <= e.upper
    # The lower bound is exactly H_k + r * (-ln r).
    top = sorted(lps, reverse=True)[:k]
    r = 1 - math.fsum(math.exp(lp) for lp in top)
    expected = -math.fsum(math.exp(lp) * lp for lp in top) - r * math.log(r)
    assert e.lower == pytest.approx(expected, abs=1e-12)
    assert e.value == e.lower
    assert e.leftover_mass == pytest.approx(r)
    assert e.upper == pytest.approx(expected + r * math.log(len(lps) - k), abs=1e-12)
    # Every estimator reports the same bounds and an estimate between them.
    for name in ESTIMATORS:
        other = token_entropy(position(lps, sampled=0, k=k), vocab_size=len(lps), estimator=name)
        assert (other.lower, other.upper) == (e.lower, e.upper)
        assert e.lower <= other.value <= e.upper
        assert other.kind == f"topk_{'lower_bound' if name == 'lower' else name}"


def test_upper_is_none_without_vocab() -> None:
    lps = log_softmax(LOGITS)
    assert token_entropy(position(lps, sampled=0, k=2)).upper is None


def test_uniform_distribution() -> None:
    v = 16
    lps = [-math.log(v)] * v
    e = token_entropy(position(lps, sampled=3), vocab_size=v)
    assert e.kind == "exact"
    assert e.value == pytest.approx(math.log(v), abs=1e-9)
    # Top-4 of a uniform distribution: the upper bound is tight (leftover spread uniformly).
    e4 = token_entropy(position(lps, sampled=0, k=4), vocab_size=v)
    assert e4.upper == pytest.approx(math.log(v), abs=1e-9)
    assert e4.lower < math.log(v)


def test_certain_token_has_zero_entropy() -> None:
    e = token_entropy(TokenLogprobs(token_id=7, logprob=0.0, top={7: 0.0}), vocab_size=100)
    assert e.value == 0.0
    assert e.kind == "exact"
    assert e.sampled_prob == 1.0
    assert e.upper == 0.0


def test_sampled_token_outside_top_is_merged() -> None:
    lps = log_softmax(LOGITS)
    # Top-2 are tokens 0 and 7; token 5 (least likely) was sampled.
    pos = position(lps, sampled=5, k=2)
    assert 5 not in pos.top
    e = token_entropy(pos, vocab_size=len(lps))
    known = [lps[0], lps[7], lps[5]]
    r = 1 - math.fsum(math.exp(lp) for lp in known)
    assert e.leftover_mass == pytest.approx(r)
    assert e.lower == pytest.approx(shannon(known) - r * math.log(r), abs=1e-12)
    assert e.upper == pytest.approx(shannon(known) + r * math.log((len(lps) - 3) / r), abs=1e-12)
    assert e.upper is not None
    assert e.lower <= shannon(lps) <= e.upper


def test_sampled_token_in_top_is_not_counted_twice() -> None:
    # vLLM returns k+1 entries with the sampled token among them: it must count once.
    half = math.log(0.5)
    e = token_entropy(TokenLogprobs(token_id=1, logprob=half, top={1: half, 2: half}))
    assert e.kind == "exact"
    assert e.leftover_mass == 0.0
    assert e.value == pytest.approx(math.log(2))


def test_empty_top_uses_sampled_token_only() -> None:
    lp = math.log(0.25)
    e = token_entropy(TokenLogprobs(token_id=1, logprob=lp), vocab_size=10, estimator="lower")
    assert e.leftover_mass == pytest.approx(0.75)
    assert e.lower == pytest.approx(-0.25 * math.log(0.25) - 0.75 * math.log(0.75))
    assert e.upper == pytest.approx(-0.25 * math.log(0.25) + 0.75 * math.log(9 / 0.75))
    assert e.kind == "topk_lower_bound"


def test_minus_infinity_logprobs_contribute_nothing() -> None:
    pos = TokenLogprobs(
        token_id=0, logprob=math.log(0.5), top={0: math.log(0.5), 1: math.log(0.5), 2: -math.inf}
    )
    e = token_entropy(pos, vocab_size=3)
    assert e.kind == "exact"
    assert e.value == pytest.approx(math.log(2))
    sampled_impossible = token_entropy(TokenLogprobs(token_id=3, logprob=-math.inf, top={}))
    assert sampled_impossible.sampled_prob == 0.0
    assert sampled_impossible.leftover_mass == 1.0
    assert sampled_impossible.value == 0.0  # -1 * ln 1: no information at all
    assert math.isfinite(sampled_impossible.value)


def test_float_overshoot_clamps_leftover_to_zero() -> None:
    # Sum of probabilities a hair above 1 (float error): leftover must be 0, not negative.
    lp = math.log(0.5 + 1e-12)
    e = token_entropy(TokenLogprobs(token_id=0, logprob=lp, top={0: lp, 1: lp}), vocab_size=2)
    assert e.leftover_mass == 0.0
    assert e.kind == "exact"
    assert e.upper == e.lower


def test_more_candidates_than_vocab_keeps_upper_above_lower() -> None:
    lps = [math.log(0.3), math.log(0.3)]
    pos = TokenLogprobs(token_id=0, logprob=lps[0], top={0: lps[0], 1: lps[1]})
    e = token_entropy(pos, vocab_size=2)
    assert e.upper is not None and e.upper >= e.lower


def test_bad_vocab_size_raises() -> None:
    with pytest.raises(ValueError):
        token_entropy(TokenLogprobs(token_id=0, logprob=-1.0), vocab_size=0)


def test_ssrl_sampled_term() -> None:
    assert ssrl_sampled_term(TokenLogprobs(0, math.log(0.5))) == pytest.approx(0.5)
    assert ssrl_sampled_term(TokenLogprobs(0, 0.0)) == 0.0
    assert ssrl_sampled_term(TokenLogprobs(0, -math.inf)) == 0.0
    # Not an entropy: a near-impossible token scores like a near-certain one.
    low = ssrl_sampled_term(TokenLogprobs(0, math.log(1e-4)))
    high = ssrl_sampled_term(TokenLogprobs(0, math.log(1 - 1e-4)))
    assert low < 0.01 and high < 0.01


def test_query_entropy_hand_checked() -> None:
    # Position 1: two equally likely tokens (H = ln 2, p = 0.5).
    # Position 2: certain token (H = 0, p = 1).
    # Position 3: sampled p = 0.25 out of a uniform 4-way (H = ln 4).
    half, quarter = math.log(0.5), math.log(0.25)
    positions = [
        TokenLogprobs(1, half, {1: half, 2: half}),
        TokenLogprobs(5, 0.0, {5: 0.0}),
        TokenLogprobs(9, quarter, {9: quarter, 10: quarter, 11: quarter, 12: quarter}),
    ]
    q = query_entropy(positions, vocab_size=50)
    assert q.tokens == 3
    assert q.kind == "exact"
    assert q.per_token == pytest.approx((math.log(2), 0.0, math.log(4)))
    assert q.mean == pytest.approx(math.log(2))  # (ln2 + 0 + 2 ln2) / 3
    assert q.max == pytest.approx(math.log(4))
    assert q.min_prob == pytest.approx(0.25)
    assert q.ssrl == pytest.approx((0.5 + 0.0 + 0.5) / 3)  # -0.25*log2(0.25) = 0.5
    assert q.aggregate("mean") == q.mean
    assert q.aggregate("min_prob") == q.min_prob
    d = q.to_dict()
    assert d["mean"] == round(math.log(2), 6)
    assert d["per_token"] == [round(math.log(2), 6), 0.0, round(math.log(4), 6)]
    assert d["kind"] == "exact" and d["tokens"] == 3


def test_query_kind_is_lower_bound_when_any_position_is() -> None:
    half = math.log(0.5)
    positions = [TokenLogprobs(1, half, {1: half, 2: half}), TokenLogprobs(3, half, {3: half})]
    q = query_entropy(positions)
    assert q.kind == "topk_lower_bound"


def test_empty_query() -> None:
    q = query_entropy([])
    assert q == EMPTY_QUERY_ENTROPY
    assert (q.mean, q.max, q.min_prob, q.ssrl, q.tokens, q.kind) == (0.0, 0.0, 1.0, 0.0, 0, "empty")
    assert q.per_token == ()


def test_uncertainty_direction() -> None:
    calm = QueryEntropy(mean=0.1, max=0.2, min_prob=0.9, ssrl=0.05, tokens=2, kind="exact")
    unsure = QueryEntropy(mean=2.0, max=3.0, min_prob=0.1, ssrl=0.4, tokens=2, kind="exact")
    for name in AGGREGATES:
        assert unsure.uncertainty(name) > calm.uncertainty(name), name
    assert unsure.uncertainty("min_prob") == pytest.approx(0.9)
    assert unsure.uncertainty("mean") == 2.0


def test_unknown_aggregate_raises() -> None:
    with pytest.raises(ValueError, match="unknown entropy aggregate"):
        EMPTY_QUERY_ENTROPY.aggregate("median")
    with pytest.raises(ValueError):
        EMPTY_QUERY_ENTROPY.uncertainty("tokens")


def check_bounds(logits: list[float], k_frac: float, sampled_frac: float) -> None:
    lps = log_softmax(logits)
    v = len(lps)
    k = max(1, round(k_frac * v))
    sampled = int(sampled_frac * v)
    e = token_entropy(position(lps, sampled=sampled, k=k), vocab_size=v)
    true_h = shannon(lps)
    assert e.upper is not None
    assert e.lower - 1e-9 <= true_h <= e.upper + 1e-9
    assert 0.0 <= e.leftover_mass <= 1.0
    assert 0.0 <= e.sampled_prob <= 1.0


def test_bounds_on_seeded_random_distributions() -> None:
    """Always runs, even where hypothesis is not installed."""
    rng = random.Random(1234)
    for _ in range(500):
        logits = [rng.uniform(-20, 20) * rng.random() for _ in range(rng.randint(2, 60))]
        check_bounds(logits, rng.random(), rng.random() * 0.999)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the seeded test above still covers the property
    pass
else:
    # Derandomized: CI runs the same 200 examples every time (a failure reproduces).
    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(
        logits=st.lists(st.floats(min_value=-20, max_value=20), min_size=2, max_size=40),
        k_frac=st.floats(min_value=0.0, max_value=1.0),
        sampled_frac=st.floats(min_value=0.0, max_value=0.999),
    )
    def test_bounds_property(logits: list[float], k_frac: float, sampled_frac: float) -> None:
        check_bounds(logits, k_frac, sampled_frac)


# ----- estimators over a realistic vocabulary -------------------------------------------------

V_REAL = 49152  # SmolLM2's vocabulary


def _full_position(logits: list[float], k: int, sampled: int = 0) -> tuple[TokenLogprobs, float]:
    lps = log_softmax(logits)
    order = sorted(range(len(lps)), key=lambda i: lps[i], reverse=True)
    top = {i: lps[i] for i in order[:k]}
    top.setdefault(sampled, lps[sampled])
    rank = order.index(sampled) + 1
    return TokenLogprobs(token_id=sampled, logprob=lps[sampled], top=top, sampled_rank=rank), shannon(lps)


@pytest.mark.parametrize("sigma", [1.5, 2.0, 2.5, 3.5])
def test_gaussian_tail_recovers_normal_logits(sigma: float) -> None:
    # Logits drawn from N(0, sigma^2) over a real vocabulary size: the model the estimator
    # assumes. Its estimate from the top-20 is close (the 20th order statistic it anchors on is
    # itself random: errors up to ~0.16 nats were seen over seeds); the lower bound is far off.
    rng = random.Random(int(sigma * 10))
    logits = [rng.gauss(0.0, sigma) for _ in range(V_REAL)]
    pos, true_h = _full_position(logits, 20)
    e = token_entropy(pos, V_REAL, "gaussian_tail")
    assert e.kind == "topk_gaussian_tail"
    assert e.lower <= true_h and e.upper is not None and true_h <= e.upper
    assert abs(e.value - true_h) < 0.2
    assert abs(e.value - true_h) < abs(e.lower - true_h) / 4


@pytest.mark.parametrize("s", [0.9, 1.1, 1.4])
def test_power_tail_recovers_a_zipf_vocabulary(s: float) -> None:
    logits = [-s * math.log(j) for j in range(1, V_REAL + 1)]
    pos, true_h = _full_position(logits, 20)
    e = token_entropy(pos, V_REAL, "power_tail")
    assert e.value == pytest.approx(true_h, abs=0.02)


def test_a_sampled_token_beyond_the_top_k_does_not_skew_the_tail() -> None:
    rng = random.Random(3)
    logits = [rng.gauss(0.0, 2.0) for _ in range(V_REAL)]
    order = sorted(range(V_REAL), key=lambda i: logits[i], reverse=True)
    inside, _ = _full_position(logits, 20, sampled=order[0])
    outside, true_h = _full_position(logits, 20, sampled=order[5000])
    assert outside.sampled_rank == 5001 and len(outside.top) == 21
    a = token_entropy(inside, V_REAL).value
    b = token_entropy(outside, V_REAL).value
    assert abs(a - b) < 0.05 and abs(b - true_h) < 0.2
    # Without the engine's rank the smallest candidate is taken as the extra one: same result.
    no_rank = TokenLogprobs(token_id=outside.token_id, logprob=outside.logprob, top=outside.top)
    assert token_entropy(no_rank, V_REAL).value == pytest.approx(b, abs=1e-9)


def test_estimates_stay_within_the_bounds() -> None:
    rng = random.Random(11)
    for _ in range(200):
        n = rng.choice([30, 300, 3000])
        logits = [rng.gauss(0.0, rng.uniform(0.1, 6.0)) for _ in range(n)]
        pos, true_h = _full_position(logits, rng.choice([1, 5, 20]), sampled=rng.randrange(n))
        for name in ESTIMATORS:
            e = token_entropy(pos, n, name)
            assert e.upper is not None
            assert e.lower - 1e-9 <= true_h <= e.upper + 1e-9
            assert e.lower <= e.value <= e.upper
            assert math.isfinite(e.value)


def test_estimators_need_the_vocabulary_else_report_the_lower_bound() -> None:
    lps = log_softmax(LOGITS)
    e = token_entropy(position(lps, sampled=0, k=2))
    assert DEFAULT_ESTIMATOR == "gaussian_tail"
    assert e.kind == "topk_lower_bound" and e.value == e.lower and e.upper is None


def test_unknown_estimator_is_refused() -> None:
    with pytest.raises(ValueError, match="gaussian_tail"):
        token_entropy(TokenLogprobs(0, -1.0), 10, "magic")


def test_trace_reports_estimate_kind_and_both_bounds() -> None:
    rng = random.Random(5)
    positions = []
    truths = []
    for _ in range(4):
        pos, true_h = _full_position([rng.gauss(0.0, 2.5) for _ in range(V_REAL)], 20)
        positions.append(pos)
        truths.append(true_h)
    q = query_entropy(positions, V_REAL)
    d = q.to_dict()
    assert d["kind"] == "topk_gaussian_tail"
    assert len(d["per_token"]) == len(d["per_token_lower"]) == len(d["per_token_upper"]) == 4
    for lo, v, hi in zip(d["per_token_lower"], d["per_token"], d["per_token_upper"], strict=True):
        assert lo <= v <= hi
    true_mean = sum(truths) / 4
    assert d["lower"]["mean"] <= d["mean"] <= d["upper"]["mean"]
    assert d["lower"]["mean"] <= true_mean <= d["upper"]["mean"]
    assert d["lower"]["max"] <= max(truths) <= d["upper"]["max"]
    # Unknown vocabulary: no upper bounds, reported as null.
    d2 = query_entropy(positions).to_dict()
    assert d2["per_token_upper"] is None and d2["upper"]["mean"] is None
    # An empty query reports degenerate bounds.
    assert EMPTY_QUERY_ENTROPY.to_dict()["lower"] == {"mean": 0.0, "max": 0.0}
