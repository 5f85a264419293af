"""Scoring open-domain QA answers: exact match, F1, pass@k, majority vote, AUROC.

The conventions are those of SQuAD, Search-R1 and SSRL, so numbers compare with published ones:

- Answers are normalised with SQuAD's `normalize_answer` (lower case, ASCII punctuation and the
  articles a/an/the removed, whitespace folded), re-exported here from `router.tags`.
- Exact match and F1 take the best score over the gold answers.
- F1 is SQuAD's bag-of-tokens F1 on normalised text. When the prediction or the gold has no
  token left after normalisation, F1 is 1 if both are empty, else 0 (SQuAD 2.0's rule; the
  1.1 script divides by zero there).
- pass@k is the unbiased estimator of Chen et al. 2021 (HumanEval): with n samples of which
  c are correct, pass@k = 1 - C(n-c, k) / C(n, k), the probability that k samples drawn
  without replacement from the n contain at least one correct one.
- Intervals are percentile-bootstrap 95 % intervals over questions: BOOTSTRAP_RESAMPLES
  resamples of the questions with replacement, drawn by random.Random(BOOTSTRAP_SEED), so
  the same rows always give the same interval.
- AUROC is the Mann-Whitney U statistic divided by n_pos * n_neg, ties counted one half
  (mid-ranks), so a constant score has AUROC 0.5 whatever the labels.

Pure functions, no I/O.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from router.tags import normalize_answer

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "Interval",
    "MajorityVote",
    "auroc",
    "best_exact_match",
    "best_f1",
    "bootstrap_mean",
    "bootstrap_weights",
    "exact_match",
    "f1_score",
    "is_repetitive",
    "majority_vote",
    "mean",
    "normalize_answer",
    "pass_at_k",
    "pass_at_k_curve",
    "percentile_interval",
]


def _golds(gold: str | Iterable[str]) -> list[str]:
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return golds


def exact_match(prediction: str | None, gold: str) -> bool:
    """Whether the normalised prediction equals the normalised gold answer.

    A missing prediction (None) is never right.
    """
    if prediction is None:
        return False
    return normalize_answer(prediction) == normalize_answer(gold)


def f1_score(prediction: str | None, gold: str) -> float:
    """SQuAD token F1 between one prediction and one gold answer (0 for None)."""
    if prediction is None:
        return 0.0
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_exact_match(prediction: str | None, golds: str | Iterable[str]) -> bool:
    """Exact match against the best of the gold answers."""
    return any(exact_match(prediction, g) for g in _golds(golds))


def best_f1(prediction: str | None, golds: str | Iterable[str]) -> float:
    """F1 against the best of the gold answers."""
    return max(f1_score(prediction, g) for g in _golds(golds))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: 1 - C(n-c, k) / C(n, k), computed exactly then rounded to a float.

    n samples, c of them correct, k <= n drawn. Raises ValueError for impossible arguments.
    """
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def pass_at_k_curve(correct_counts: Sequence[tuple[int, int]], k_max: int) -> dict[int, float]:
    """Mean pass@k over questions for k = 1..k_max; `correct_counts` holds (n, c) per question.

    Every question must have n >= k_max samples. An empty sequence gives an empty dict.
    """
    if not correct_counts:
        return {}
    curve: dict[int, float] = {}
    for k in range(1, k_max + 1):
        curve[k] = math.fsum(pass_at_k(n, c, k) for n, c in correct_counts) / len(correct_counts)
    return curve


@dataclass(frozen=True, slots=True)
class MajorityVote:
    """The one majority vote of ssrl: the loop's `votes` (SSRL's repeated-sampling gain, no
    gold needed) and `ssrl eval`'s majority accuracy both use it."""

    # The winning normalised answer, how many samples gave it, and the first sample that did.
    answer: str
    count: int
    index: int
    counts: dict[str, int]


def majority_vote(answers: Sequence[str | None]) -> MajorityVote:
    """The most frequent normalised answer among `answers`.

    Ties go to the answer that appeared first. Empty (or None) answers only win when no
    sample gave a non-empty one. Raises ValueError for no answers at all.
    """
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    normalized = [normalize_answer(a) if a is not None else "" for a in answers]
    counts = Counter(normalized)
    candidates = [a for a in normalized if a] or normalized
    best = max(candidates, key=lambda a: (counts[a], -normalized.index(a)))
    return MajorityVote(best, counts[best], normalized.index(best), dict(counts))


def auroc(scores: Sequence[float], labels: Sequence[bool | int]) -> float | None:
    """Area under the ROC curve of `scores` for predicting `labels` (True = positive).

    Computed as the Mann-Whitney U statistic over (positive, negative) pairs: a pair counts 1
    when the positive scores higher, 1/2 when they tie. Uses mid-ranks, O(n log n). None
    when either class is empty (the AUROC is undefined). NaN scores are rejected.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if any(math.isnan(s) for s in scores):
        raise ValueError("scores must not be NaN")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mid_rank = (i + j) / 2 + 1  # 1-based ranks i+1..j+1 share their mean
        for t in range(i, j + 1):
            ranks[order[t]] = mid_rank
        i = j + 1
    rank_sum = math.fsum(r for r, y in zip(ranks, labels, strict=True) if y)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean, None for no values."""
    data = list(values)
    if not data:
        return None
    return math.fsum(data) / len(data)


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), numpy's default; None when empty.

    None and NaN values are ignored.
    """
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


# ----------------------------------------------------------------------------- bootstrap

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True, slots=True)
class Interval:
    """A two-sided interval (bootstrap percentile interval at `level`)."""

    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_weights(
    n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[list[int]]:
    """How often each of n items is drawn in each resample (n draws with replacement).

    Deterministic for a given (n, resamples, seed): random.Random(seed) draws them all.
    A statistic that is a sum over items is then sum(w[i] * x[i]) for each resample.
    """
    if n < 0 or resamples < 1:
        raise ValueError(f"bootstrap needs n >= 0 and resamples >= 1, got n={n}, resamples={resamples}")
    rng = random.Random(seed)
    population = range(n)
    out: list[list[int]] = []
    for _ in range(resamples):
        weights = [0] * n
        for i in rng.choices(population, k=n) if n else ():
            weights[i] += 1
        out.append(weights)
    return out


def percentile_interval(samples: Sequence[float], level: float = 0.95) -> Interval:
    """The central `level` share of `samples` (percentile method, linear interpolation)."""
    if not samples:
        raise ValueError("an interval needs at least one sample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    data = sorted(samples)  # one sort for both ends (this runs for every curve point)

    def at(q: float) -> float:
        pos = (len(data) - 1) * q
        low = math.floor(pos)
        high = min(low + 1, len(data) - 1)
        return data[low] + (data[high] - data[low]) * (pos - low)

    tail = (1.0 - level) / 2
    return Interval(at(tail), at(1.0 - tail))


def bootstrap_mean(
    values: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    weights: Sequence[Sequence[int]] | None = None,
) -> Interval | None:
    """Bootstrap interval of the mean of `values` (None for no values).

    `weights` (from `bootstrap_weights(len(values), ...)`) lets several statistics of the
    same questions share one set of resamples.
    """
    n = len(values)
    if n == 0:
        return None
    if weights is None:
        weights = bootstrap_weights(n, resamples, seed)
    means = [math.fsum(w * v for w, v in zip(ws, values, strict=True)) / n for ws in weights]
    return percentile_interval(means, level)


_WORD = re.compile(r"\w+")


def is_repetitive(response: str) -> bool:
    """Degenerate repetition: a word n-gram (n = 1..4) said three or more times back to back
    ("1609 1609 1609", "a b a b a b"), or one word making up over half of a response of six
    words or more."""
    words = [w.lower() for w in _WORD.findall(response)]
    for n in range(1, 5):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        for i in range(len(grams)):
            if i + 2 * n < len(grams) and grams[i] == grams[i + n] == grams[i + 2 * n]:
                return True
    if len(words) >= 6:
        top = max(words.count(w) for w in set(words))
        if top / len(words) > 0.5:
            return True
    return False
