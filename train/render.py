"""Native trajectories as the trained model should write them, with the spans it must not learn.

A native trajectory is laid out exactly as ssrl's loop lays it out in native mode
(`router.loop`: the model writes up to `</search>`, the loop continues with
`\\n\\n<information>`, then `</information>\\n\\n`), so what the adapter learns is what it meets
when served::

    <search> Mona Lisa painter </search>

    <information>Doc 1(Title: Mona Lisa) The Mona Lisa is a portrait by Leonardo da Vinci.</information>

    <answer> Leonardo da Vinci </answer>

Masking (the supervised stage's form of SSRL's information token masking): text a search
engine inserted (`Doc 1(Title: ...) ...` and the `</information>\\n\\n` the server writes after
it) gets no loss; information the model wrote itself does, or the model never learns to
write it (a probe that masked every block got a model that repeats its query there).

Pure: strings in, strings and character spans out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from router.tags import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    INFORMATION_CLOSE,
    INFORMATION_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    format_documents,
)

__all__ = ["Trajectory", "query_from_question", "render", "well_formed"]


@dataclass(frozen=True, slots=True)
class Trajectory:
    """The assistant's text and the ``[start, end)`` character spans that get no loss."""

    text: str
    masked: tuple[tuple[int, int], ...]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render(query: str, information: str, answer: str, *, inserted: bool) -> Trajectory:
    """One search, its information block, the answer.

    ``inserted``: the information is a search engine's documents (masked); otherwise the
    model wrote it (learned).
    """
    query, answer = _one_line(query), _one_line(answer)
    if not query or not answer:
        raise ValueError("a trajectory needs a query and an answer")
    head = f"{SEARCH_OPEN} {query} {SEARCH_CLOSE}\n\n{INFORMATION_OPEN}"
    if inserted:
        body = information.strip()
        tail = f"{INFORMATION_CLOSE}\n\n"
        text = head + body + tail + f"{ANSWER_OPEN} {answer} {ANSWER_CLOSE}"
        return Trajectory(text, ((len(head), len(head) + len(body) + len(tail)),))
    body = _one_line(information)
    if not body:
        raise ValueError("a self-written information block needs text")
    text = head + body + f"{INFORMATION_CLOSE}\n\n{ANSWER_OPEN} {answer} {ANSWER_CLOSE}"
    return Trajectory(text, ())


def render_documents(titles_and_texts: Sequence[tuple[str, str]], max_chars: int) -> str:
    """Documents in the layout the server inserts (Search-R1's `Doc i(Title: ...) text`)."""

    @dataclass(frozen=True)
    class _Doc:
        title: str
        text: str

    return format_documents([_Doc(t, x) for t, x in titles_and_texts], max_chars)


_LEAD_RE = re.compile(
    r"^(?:who|what|which|where|when|in what year|in which country|how many)\s+"
    r"(?:(?:is|was|are|were|did|does|do)\s+)?(?:the\s+|a\s+|an\s+)?",
    re.IGNORECASE,
)
_MAX_QUERY_WORDS = 10


def query_from_question(question: str) -> str:
    """A short search query written from a question: the wh-lead and its verb dropped, the
    question mark gone, at most ten words (the queries guided mode's examples teach)."""
    text = _LEAD_RE.sub("", question.strip()).rstrip("?").strip()
    words = text.split()
    return " ".join(words[:_MAX_QUERY_WORDS]).rstrip(",;:") or question.strip().rstrip("?")


_WELL_FORMED_RE = re.compile(
    re.escape(SEARCH_OPEN)
    + r"[^\n]+?"
    + re.escape(SEARCH_CLOSE)
    + r"\s*"
    + re.escape(INFORMATION_OPEN)
    + r".*?"
    + re.escape(INFORMATION_CLOSE)
    + r"\s*"
    + re.escape(ANSWER_OPEN)
    + r"[^\n]*?\S[^\n]*?"
    + re.escape(ANSWER_CLOSE),
    re.DOTALL,
)


def well_formed(transcript: str) -> bool:
    """A one-line query, a closed information block, a closed non-empty one-line answer, in
    that order (the issue's definition of a well-formed trajectory)."""
    return _WELL_FORMED_RE.search(transcript) is not None
