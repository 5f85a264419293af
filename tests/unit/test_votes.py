"""Majority vote over sampled answers, as the self-search loop uses it (`votes` > 1); the one
implementation is `router.scoring.majority_vote`, shared with `ssrl eval`."""

from __future__ import annotations

import pytest

from router.scoring import majority_vote


def test_most_frequent_normalised_answer_wins() -> None:
    vote = majority_vote(["Lyon", "Paris", "the paris.", "PARIS!"])
    assert vote.answer == "paris"
    assert vote.index == 1  # the first sample that normalises to the winner
    assert vote.counts == {"lyon": 1, "paris": 3}
    assert vote.count == 3


def test_a_tie_goes_to_the_answer_seen_first() -> None:
    vote = majority_vote(["Lyon", "Paris", "Paris", "lyon"])
    assert (vote.index, vote.answer) == (0, "lyon")
    vote = majority_vote(["Paris", "Lyon", "lyon", "paris"])
    assert (vote.index, vote.answer) == (0, "paris")
    vote = majority_vote(["Rome", "Lyon", "Paris"])
    assert (vote.index, vote.answer) == (0, "rome")


def test_empty_answers_lose_to_any_real_answer() -> None:
    vote = majority_vote(["", "  ", "the", "Paris"])
    # "", "  " and "the" all normalise to "" (three votes) yet the one real answer wins.
    assert vote.counts == {"": 3, "paris": 1}
    assert (vote.index, vote.answer) == (3, "paris")


def test_empty_answers_win_only_when_all_are_empty() -> None:
    vote = majority_vote(["", " . ", "a"])
    assert (vote.index, vote.answer) == (0, "")
    assert vote.counts == {"": 3}


def test_a_single_answer_wins() -> None:
    vote = majority_vote(["William Shakespeare"])
    assert (vote.index, vote.answer) == (0, "william shakespeare")
    assert vote.counts == {"william shakespeare": 1}


def test_no_answers_is_an_error() -> None:
    with pytest.raises(ValueError):
        majority_vote([])
