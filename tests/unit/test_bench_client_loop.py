"""The client-side loop baseline's pure pieces (bench/client_loop.py): no engine, no server."""

from __future__ import annotations

import asyncio

import pytest

from bench.client_loop import (
    ANSWER_STOP,
    FILL_STOP,
    QUERY_STOP,
    Call,
    Completion,
    Trajectory,
    answer_call,
    completion_body,
    fill_call,
    guided_messages,
    prompt_text,
    round_questions,
    run_guided,
    search_close,
    without_partial_close,
)
from router.loop import GUIDED_ANSWER_FREQUENCY_PENALTY, GUIDED_FILL_REPETITION_PENALTY
from router.prompts import GUIDED, GUIDED_EXAMPLES

CHAT = "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


class FakeServer:
    """Answers each call from a script, recording the prompts and calls it was sent."""

    def __init__(self, replies: list[tuple[str, str | None]]) -> None:
        self.replies = list(replies)
        self.seen: list[tuple[str, Call]] = []

    async def complete(self, prompt: str, call: Call) -> Completion:
        self.seen.append((prompt, call))
        text, finish = self.replies.pop(0)
        return Completion(text, finish, prompt_tokens=len(prompt), completion_tokens=len(text.split()))


def run(
    policy: str, replies: list[tuple[str, str | None]], documents: str | None = "Doc 1(Title: T) x"
) -> tuple[Trajectory, FakeServer, list[str]]:
    server = FakeServer(replies)
    searched: list[str] = []

    async def search(query: str) -> str | None:
        searched.append(query)
        return documents

    t = asyncio.run(run_guided(CHAT, policy, server.complete, search))
    return t, server, searched


def test_guided_messages_are_ssrls_conversation() -> None:
    messages = guided_messages("Who painted the Mona Lisa?")
    assert messages[0] == {"role": "system", "content": GUIDED}
    assert len(messages) == 2 + 2 * len(GUIDED_EXAMPLES)
    assert messages[-1] == {"role": "user", "content": "Who painted the Mona Lisa?"}
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(GUIDED_EXAMPLES)


def test_policy_always_inserts_documents_and_resends_the_whole_text() -> None:
    t, server, searched = run("always", [(" Mona Lisa painter ", "stop"), (" Leonardo da Vinci ", "stop")])
    assert searched == ["Mona Lisa painter"]
    assert t.route == "external"
    assert t.transcript == (
        "<search> Mona Lisa painter </search>\n\n<information>Doc 1(Title: T) x</information>\n\n"
        "<answer> Leonardo da Vinci </answer>"
    )
    assert t.answer == "Leonardo da Vinci"
    prompts = [p for p, _ in server.seen]
    assert prompts[0] == CHAT + "<search>"
    assert (
        prompts[1]
        == CHAT
        + "<search> Mona Lisa painter </search>\n\n<information>Doc 1(Title: T) x</information>\n\n<answer>"
    )
    assert [c.kind for _, c in server.seen] == ["query", "answer"]
    assert t.prompt_tokens == sum(len(p) for p in prompts)


def test_policy_never_lets_the_model_fill_the_block() -> None:
    t, server, searched = run(
        "never", [(" Mona Lisa painter", "stop"), ("Leonardo painted it.", "stop"), (" Leonardo", "stop")]
    )
    assert searched == []
    assert t.route == "internal"
    assert [c.kind for _, c in server.seen] == ["query", "fill", "answer"]
    # No space after the query: the loop writes " </search>".
    assert server.seen[1][0] == CHAT + "<search> Mona Lisa painter </search>\n\n<information>"
    assert t.transcript.endswith(
        "<information>Leonardo painted it.</information>\n\n<answer> Leonardo</answer>"
    )


def test_failed_search_falls_back_to_a_fill() -> None:
    t, server, _ = run("always", [(" q", "stop"), ("facts", "stop"), (" a", "stop")], documents=None)
    assert t.route == "internal"
    assert [c.kind for _, c in server.seen] == ["query", "fill", "answer"]


def test_empty_query_skips_the_information_block() -> None:
    t, server, searched = run("always", [("  ", "stop"), (" a", "stop")])
    assert t.route == "skipped" and searched == []
    assert t.transcript == "<search>  </search>\n<answer> a</answer>"
    assert [c.kind for _, c in server.seen] == ["query", "answer"]


def test_stop_handling_matches_the_loop() -> None:
    assert QUERY_STOP == ("</search>", "\n")
    assert FILL_STOP == ("</information>",)
    assert ANSWER_STOP == ("</answer>", "\n", "</")
    assert without_partial_close("Paris</ans", ANSWER_STOP) == "Paris"
    assert without_partial_close("Paris</", ("</answer>",)) == "Paris"
    assert without_partial_close("Paris<", ("</answer>",)) == "Paris<"  # one char: kept, as the loop does
    assert without_partial_close("Paris", ANSWER_STOP) == "Paris"
    assert search_close("query ") == "</search>"
    assert search_close("query") == " </search>"
    # A partial close tag left by a length stop is cut before the text joins the transcript.
    t, _, _ = run("never", [(" q", "stop"), ("facts </inform", "length"), (" a", "stop")])
    assert "<information>facts </information>" in t.transcript


@pytest.mark.parametrize(
    ("call", "logprobs", "penalties"),
    [
        (Call("query", QUERY_STOP, 48, 20), 20, (1.0, 0.0)),
        (fill_call(), None, (GUIDED_FILL_REPETITION_PENALTY, 0.0)),
        (answer_call(), None, (1.0, GUIDED_ANSWER_FREQUENCY_PENALTY)),
    ],
)
def test_completion_body(call: Call, logprobs: int | None, penalties: tuple[float, float]) -> None:
    body = completion_body("bench", prompt_text(CHAT, "<search>"), call)
    assert body["prompt"] == CHAT + "<search>"
    assert body["stop"] == list(call.stop)
    assert body["temperature"] == 0.0 and body["max_tokens"] == call.max_tokens
    assert body.get("logprobs") == logprobs
    assert (body["repetition_penalty"], body["frequency_penalty"]) == penalties


def test_round_questions_rotate_and_wrap() -> None:
    qs = ["a", "b", "c", "d", "e"]
    assert round_questions(qs, 2, 0) == ["a", "b"]
    assert round_questions(qs, 2, 1) == ["c", "d"]
    assert round_questions(qs, 2, 2) == ["e", "a"]
    assert round_questions(qs, 7, 0) == ["a", "b", "c", "d", "e", "a", "b"]
