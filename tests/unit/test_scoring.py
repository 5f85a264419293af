"""router.scoring: SQuAD normalisation, EM/F1, pass@k, majority vote, AUROC."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from router.scoring import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    Interval,
    auroc,
    best_exact_match,
    best_f1,
    bootstrap_mean,
    bootstrap_weights,
    exact_match,
    f1_score,
    majority_vote,
    mean,
    normalize_answer,
    pass_at_k,
    pass_at_k_curve,
    percentile_interval,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a  Tale of  Two Cities. ", "tale of two cities"),
        ("An apple, the pear!", "apple pear"),
        ("U.S.A.", "usa"),
        ("Theatre anthem", "theatre anthem"),  # articles only as whole words
        ("Paris\n\tFrance", "paris france"),
        ("1,000", "1000"),
        ("", ""),
        ("the", ""),
    ],
)
def test_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_cases():
    assert exact_match("The Beatles", "beatles")
    assert exact_match("Paris.", "paris")
    assert not exact_match("Paris, France", "Paris")
    assert not exact_match(None, "Paris")
    assert not exact_match("", "Paris")


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Paris", "Paris", 1.0),
        ("the city of Paris", "Paris", 2 * (1 / 3) * 1 / (1 / 3 + 1)),  # p=1/3, r=1 -> 0.5
        ("Barack Obama", "Obama", 2 * 0.5 * 1 / 1.5),  # p=1/2, r=1 -> 2/3
        ("New York City", "York New", 2 * (2 / 3) * 1 / (2 / 3 + 1)),  # bag of tokens: 0.8
        ("London", "Paris", 0.0),
        ("the", "the", 1.0),  # both empty after normalisation
        ("the", "Paris", 0.0),
        ("a a b", "a b b", 2 / 3),  # "a a b" -> "b", "a b b" -> "b b": p=1, r=1/2
    ],
)
def test_f1_hand_checked(prediction, gold, expected):
    assert f1_score(prediction, gold) == pytest.approx(expected)


def test_f1_repeated_tokens_count_once_per_match():
    # pred "b" vs gold "b b": overlap 1, precision 1, recall 1/2 -> 2/3
    assert f1_score("b", "b b") == pytest.approx(2 / 3)
    assert f1_score("x y y", "y y z") == pytest.approx(2 / 3)  # overlap 2: p=2/3, r=2/3


def test_best_over_multiple_gold_answers():
    golds = ["14 December 1972 UTC", "December 1972"]
    assert best_exact_match("december 1972", golds)
    assert not best_exact_match("1972", golds)
    # F1 is the best single-gold score, not a merge: vs "December 1972" p=1, r=1/2 -> 2/3.
    assert best_f1("1972", golds) == pytest.approx(2 / 3)
    assert best_f1("the moon", golds) == 0.0
    assert best_exact_match("Bob Russell", ["Bobby Scott", "Bob Russell"])
    assert best_f1(None, ["x"]) == 0.0
    with pytest.raises(ValueError):
        best_f1("x", [])


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for s in subsets if any(outcomes[i] for i in s))
    return hits / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [
        (1, 0, 1),
        (1, 1, 1),
        (5, 0, 3),
        (5, 1, 1),
        (5, 1, 3),
        (5, 2, 2),
        (6, 3, 4),
        (8, 1, 8),
        (8, 7, 1),
        (10, 3, 5),
        (10, 9, 2),
        (12, 4, 6),
    ],
)
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_forms_and_monotonicity():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share correct
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    values = [pass_at_k(10, 2, k) for k in range(1, 11)]
    assert values == sorted(values)
    assert values[-1] == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_curve_is_the_mean_over_questions():
    curve = pass_at_k_curve([(4, 0), (4, 2), (4, 4)], 4)
    assert list(curve) == [1, 2, 3, 4]
    assert curve[1] == pytest.approx((0 + 0.5 + 1) / 3)
    assert curve[2] == pytest.approx((0 + brute_force_pass_at_k(4, 2, 2) + 1) / 3)
    assert curve[4] == pytest.approx(2 / 3)
    assert pass_at_k_curve([], 3) == {}


def test_majority_vote():
    vote = majority_vote(["Paris", "paris.", "London", "The Paris"])
    assert (vote.answer, vote.count, vote.index) == ("paris", 3, 0)
    assert vote.counts == {"paris": 3, "london": 1}
    # Ties go to the answer seen first.
    tie = majority_vote(["Rome", "Oslo", "Oslo", "Rome"])
    assert (tie.answer, tie.index) == ("rome", 0)
    # Empty answers only win when nothing else was said.
    assert majority_vote(["", None, "", "Bern"]).answer == "bern"
    assert majority_vote(["", None]).answer == ""
    with pytest.raises(ValueError):
        majority_vote([])


def brute_force_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=False) if y]
    neg = [s for s, y in zip(scores, labels, strict=False) if not y]
    total = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return total / (len(pos) * len(neg))


def test_auroc_known_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5  # all tied
    # one inversion among four pairs
    assert auroc([0.1, 0.6, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half
    assert auroc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert auroc([0.3, 0.4], [1, 1]) is None
    assert auroc([], []) is None
    with pytest.raises(ValueError):
        auroc([0.1], [1, 0])
    with pytest.raises(ValueError):
        auroc([math.nan, 0.1], [1, 0])


def test_auroc_matches_pairwise_count_with_many_ties():
    rng = random.Random(7)
    for _ in range(50):
        size = rng.randint(2, 30)
        scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(size)]
        labels = [rng.random() < 0.4 for _ in range(size)]
        if all(labels) or not any(labels):
            labels[0] = not labels[0]
        assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels))


def test_mean():
    assert mean([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)
    assert mean([]) is None


def test_bootstrap_weights_are_reproducible_draws_with_replacement():
    weights = bootstrap_weights(7, resamples=50, seed=3)
    assert len(weights) == 50 and all(len(w) == 7 and sum(w) == 7 for w in weights)
    assert bootstrap_weights(7, resamples=50, seed=3) == weights
    assert bootstrap_weights(7, resamples=50, seed=4) != weights
    assert bootstrap_weights(0, resamples=2) == [[], []]
    with pytest.raises(ValueError):
        bootstrap_weights(3, resamples=0)


def test_bootstrap_mean_interval():
    assert bootstrap_mean([]) is None
    # a constant: a zero-width interval
    assert bootstrap_mean([1.0] * 10) == Interval(1.0, 1.0)
    # 30 of 60 right: the interval holds 0.5 and is about +-1.96 * sqrt(0.25 / 60) = +-0.127 wide
    values = [float(i % 2) for i in range(60)]
    iv = bootstrap_mean(values)
    assert iv is not None and 0.5 in iv
    assert 0.08 < 0.5 - iv.low < 0.17 and 0.08 < iv.high - 0.5 < 0.17
    assert bootstrap_mean(values) == iv  # fixed default seed
    assert iv.to_dict() == {"low": iv.low, "high": iv.high}
    assert BOOTSTRAP_RESAMPLES == 1000 and isinstance(BOOTSTRAP_SEED, int)


def test_percentile_interval():
    iv = percentile_interval([float(i) for i in range(101)])
    assert (iv.low, iv.high) == (pytest.approx(2.5), pytest.approx(97.5))
    iv = percentile_interval([float(i) for i in range(101)], level=0.5)
    assert (iv.low, iv.high) == (pytest.approx(25.0), pytest.approx(75.0))
    with pytest.raises(ValueError):
        percentile_interval([])
    with pytest.raises(ValueError):
        percentile_interval([1.0], level=1.0)


@pytest.mark.parametrize(
    ("text", "repetitive"),
    [
        ("1609  1609 1609 1609", True),
        ("a b a b a b", True),
        ("the the the", True),
        ("William Shakespeare", False),
        ("Paris is the capital of France", False),
        ("yes yes no yes maybe yes yes", True),  # one word over half of 6+ words
        ("", False),
    ],
)
def test_degenerate_repetition(text: str, repetitive: bool) -> None:
    from router.scoring import is_repetitive

    assert is_repetitive(text) is repetitive
