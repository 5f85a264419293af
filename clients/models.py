"""Typed views of what ssrl answers: the self-search trace, chat results and stream events.

The models mirror the server's extension fields (`choices[i].self_search`,
`message.reasoning`, `url_citation` annotations). Every model keeps fields it does not know
(`extra="allow"`), so a newer server's additions survive parsing, and every field has a
default, so a trimmed or older trace still parses.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Policy = Literal["threshold", "ssrl", "budget", "always", "never"]
Aggregate = Literal["mean", "max", "min_prob", "ssrl"]
Mode = Literal["native", "guided"]
Decision = Literal["external", "internal", "skipped"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


# ----- the trace ----------------------------------------------------------------------------


class Entropy(_Model):
    """Uncertainty of one query's tokens (nats; `min_prob` is a probability)."""

    mean: float = 0.0
    max: float = 0.0
    min_prob: float = 1.0
    ssrl: float = 0.0
    tokens: int = 0
    kind: str = ""
    per_token: list[float] = Field(default_factory=list)


class Document(_Model):
    """A document an external search inserted."""

    title: str = ""
    url: str | None = None
    snippet: str = ""
    score: float | None = None
    source: str = ""


class SearchRecord(_Model):
    """One `<search>` of a trajectory: the query, its entropy and how it was answered."""

    index: int = 0
    query: str = ""
    entropy: Entropy = Field(default_factory=Entropy)
    decision: Decision | str = "internal"
    reason: str = ""
    policy: str = ""
    fallback: str | None = None
    backend: str | None = None
    latency_s: float = 0.0
    documents: list[Document] = Field(default_factory=list)
    information: str = ""


class _TraceFields(_Model):
    searches: list[SearchRecord] = Field(default_factory=list)
    external_calls: int = 0
    internal_fills: int = 0
    fallbacks: int = 0
    turns: int = 0
    # Engine requests the trajectory made (native mode's single pass: 1 + external searches).
    engine_requests: int = 0
    answered: bool = False
    notes: list[str] = Field(default_factory=list)


class VoteSample(_TraceFields):
    """One sampled trajectory of a majority vote: its answer and its own trace."""

    answer: str = ""


class Vote(_Model):
    votes: int = 0
    winner: int = 0
    answer: str = ""
    counts: dict[str, int] = Field(default_factory=dict)
    samples: list[VoteSample] = Field(default_factory=list)


class Trace(_TraceFields):
    """`choices[i].self_search`: one record per search, totals and (with votes) the vote."""

    vote: Vote | None = None


# ----- chat results -------------------------------------------------------------------------


class Citation(_Model):
    """An OpenAI `url_citation` annotation (one per external document)."""

    url: str
    title: str = ""
    start_index: int = 0
    end_index: int = 0


class Usage(_Model):
    """Token usage, summed over every engine call of the loop. Also a stream event."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Choice(_Model):
    index: int = 0
    answer: str = ""
    reasoning: str | None = None
    trace: Trace | None = None
    citations: list[Citation] = Field(default_factory=list)
    finish_reason: str | None = None


class ChatResult(_Model):
    """A chat completion; the shortcuts (`answer`, `trace`, ...) read the first choice.

    Against a plain OpenAI-compatible server `trace` and `reasoning` are None and `answer`
    is the message content. `raw` is the response JSON as the server sent it.
    """

    id: str = ""
    model: str = ""
    choices: list[Choice] = Field(default_factory=list)
    usage: Usage | None = None
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)

    def _first(self) -> Choice:
        return self.choices[0] if self.choices else Choice()

    @property
    def answer(self) -> str:
        return self._first().answer

    @property
    def reasoning(self) -> str | None:
        return self._first().reasoning

    @property
    def trace(self) -> Trace | None:
        return self._first().trace

    @property
    def citations(self) -> list[Citation]:
        return self._first().citations

    @property
    def finish_reason(self) -> str | None:
        return self._first().finish_reason


# ----- stream events ------------------------------------------------------------------------


class ReasoningDelta(_Model):
    """Transcript text (with its tags) as the model writes it."""

    type: Literal["reasoning"] = "reasoning"
    text: str
    index: int = 0


class SearchDecided(_Model):
    """A search, sent as soon as it is decided (before its information block)."""

    type: Literal["search"] = "search"
    record: SearchRecord
    index: int = 0


class AnswerDelta(_Model):
    """Text of the final answer (`delta.content`)."""

    type: Literal["answer"] = "answer"
    text: str
    index: int = 0


class TraceEvent(_Model):
    """A choice finished: its finish reason, the whole trace (None from a plain server) and
    its citations."""

    type: Literal["trace"] = "trace"
    trace: Trace | None = None
    finish_reason: str | None = None
    citations: list[Citation] = Field(default_factory=list)
    index: int = 0


StreamEvent = ReasoningDelta | SearchDecided | AnswerDelta | TraceEvent | Usage


# ----- retrieval ----------------------------------------------------------------------------


class SearchHit(_Model):
    title: str = ""
    url: str | None = None
    snippet: str = ""
    score: float | None = None
    source: str = ""


class SearchResult(_Model):
    """`GET /v1/search`: the documents the server's backend chain found for one query."""

    query: str = ""
    backend: str = ""
    latency_s: float = 0.0
    cache_hit: bool = False
    data: list[SearchHit] = Field(default_factory=list)


class RetrievedDocument(_Model):
    """One hit of `POST /retrieve` (Search-R1's shape: title and text in `contents`)."""

    id: str = ""
    contents: str = ""
    score: float | None = None

    @property
    def title(self) -> str:
        return self.contents.partition("\n")[0]

    @property
    def text(self) -> str:
        return self.contents.partition("\n")[2]


class Model(_Model):
    id: str
    owned_by: str = ""
    max_model_len: int | None = None
