"""Majority vote over several sampled answers (SSRL's repeated-sampling gain, no gold needed)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from router.tags import normalize_answer


@dataclass(frozen=True)
class Vote:
    winner: int  # index of the chosen sample
    normalized: str
    counts: dict[str, int]


def majority_vote(answers: Sequence[str]) -> Vote:
    """The most frequent normalised answer; ties go to the answer seen first.

    Empty answers only win when every answer is empty.
    """
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    normalized = [normalize_answer(a) for a in answers]
    counts = Counter(normalized)
    candidates = [n for n in normalized if n] or normalized
    best = max(candidates, key=lambda n: (counts[n], -normalized.index(n)))
    return Vote(winner=normalized.index(best), normalized=best, counts=dict(counts))
