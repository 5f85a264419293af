"""Guided mode's worked examples and the question it writes again before `<answer>`."""

from __future__ import annotations

import pytest

import router.prompts as prompts
from router.prompts import GUIDED_EXAMPLES, answer_cue, example_messages


def test_answer_cue_restates_the_question_on_one_line() -> None:
    assert answer_cue("Who wrote\n  Hamlet?") == "Question: Who wrote Hamlet?\n"
    assert answer_cue("") == answer_cue("   ") == ""


def test_a_long_user_message_is_not_repeated() -> None:
    # An agent's instructions or a pasted document would double the prompt.
    assert answer_cue("x" * (prompts.GUIDED_RESTATE_MAX_CHARS + 1)) == ""
    assert answer_cue("x" * prompts.GUIDED_RESTATE_MAX_CHARS) != ""


def test_examples_show_the_cue_the_loop_writes() -> None:
    messages = example_messages("guided")
    assert len(messages) == 2 * len(GUIDED_EXAMPLES)
    for user, assistant in zip(messages[::2], messages[1::2], strict=True):
        # Each worked transcript restates its own question right before its answer.
        cue = answer_cue(user["content"])
        assert cue and f"</information>\n\n{cue}<answer> " in assistant["content"]


def test_cue_off_leaves_the_protocol_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts, "GUIDED_RESTATE_QUESTION", False)
    assert answer_cue("Who wrote Hamlet?") == ""
    assert all("Question:" not in m["content"] for m in example_messages("guided"))


def test_native_mode_has_no_examples() -> None:
    assert example_messages("native") == []
