"""Native mode's single pass (router/loop.py) on a scripted engine: one engine request per
trajectory until the policy calls the search API.

The model's whole trajectory is one script; `</search>` is watched in the stream, not a stop
string. A self-filled search reads on in the same request; an external one aborts it, inserts
the documents and resumes with one new request; text the engine wrote past an aborted
`</search>` never reaches the client but counts in usage. The stream still equals the kept
transcript (tests.unit.test_loop.check_invariants runs on every trajectory here).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from router.engine.remote_engine import RemoteEngine, RemoteEngineConfig
from router.loop import LoopConfig, SearchDecided, SelfSearchLoop, TextDelta
from router.policies import AlwaysPolicy, NeverPolicy
from router.search.service import SearchService
from tests.scripted_engine import CharTokenizer, ScriptedEngine, script
from tests.unit.test_loop import INFO, PROMPT, FakeBackend, collect, config

ONE = "<search> capital of France </search>\n\n<information>Paris is the capital.</information>\n\n"
ANSWER = "<answer> Paris </answer>"
TWO = (
    "<search> capital of France </search>\n\n<information>It is Paris.</information>\n\n"
    "<search> Paris river </search>\n\n<information>The Seine.</information>\n\n"
)


def run(engine: ScriptedEngine, cfg: LoopConfig, backend: FakeBackend | None = None):
    """The trajectory (stream invariants checked by `collect`), the text it streamed, and the
    aborts counted as a client's."""
    aborts: list[int] = []
    events, result = collect(engine, cfg, SearchService([backend or FakeBackend()]), lambda: aborts.append(1))
    shown = "".join(e.text for e in events if isinstance(e, TextDelta))
    return result, shown, aborts


def test_self_filled_searches_are_one_request_the_model_writes_whole() -> None:
    engine = ScriptedEngine([script(TWO + ANSWER)])
    result, shown, aborts = run(engine, config(policy=NeverPolicy()))
    assert result.engine_requests == 1 and len(engine.calls) == 1
    assert engine.calls[0].options.stop == ("</answer>",)
    assert result.transcript == TWO + ANSWER == shown
    assert [(s.query, s.route, s.information) for s in result.searches] == [
        ("capital of France", "internal", "It is Paris."),
        ("Paris river", "internal", "The Seine."),
    ]
    # Each decision was made on the query's own tokens, read from the one stream.
    # (one token per character; blanks carry no query)
    assert [s.entropy.tokens for s in result.searches] == [len("capitalofFrance"), len("Parisriver")]
    assert result.answer == "Paris" and result.completion_tokens == len(TWO + ANSWER)
    assert engine.aborted == [] and aborts == []


def test_an_external_search_cuts_the_request_and_resumes_with_one_new_one() -> None:
    engine = ScriptedEngine([script(ONE + ANSWER), script(ANSWER)])
    backend = FakeBackend()
    result, shown, aborts = run(engine, config(policy=AlwaysPolicy()), backend)
    assert result.engine_requests == 2 and engine.aborted == ["req-1"]
    # The loop cut on purpose: no abort counted as a client's.
    assert aborts == []
    (search,) = result.searches
    assert search.route == "external" and backend.queries == [("capital of France", 3)]
    # What the model wrote past `</search>` was never shown nor kept: the documents were.
    assert "Paris is the capital." not in shown and INFO in shown
    assert engine.calls[1].prompt_text.endswith(f"</search>\n\n<information>{INFO}</information>\n\n")
    # ... but it was generated: usage counts what the engine wrote before the abort.
    written = len("<search> capital of France </search>") + len(ANSWER)
    assert result.completion_tokens > written
    assert result.trace()["engine_requests"] == 2


def test_a_model_that_skips_its_information_gets_the_tag_written_for_it() -> None:
    # Self-filled, but the model goes straight to its answer: the loop cuts the request,
    # writes `<information>` and asks for the block, as the stop-based loop always did.
    engine = ScriptedEngine(
        [
            script("<search> capital of France </search>\n\n<answer> Lyon </answer>"),
            script("Paris is the capital.</information>"),
            script(ANSWER),
        ]
    )
    result, shown, _ = run(engine, config(policy=NeverPolicy()))
    assert result.engine_requests == 3 and "req-1" in engine.aborted
    assert engine.calls[1].prompt_text.endswith("</search>\n\n<information>")
    assert result.searches[0].information == "Paris is the capital."
    assert "Lyon" not in shown and result.answer == "Paris"


def test_a_self_written_block_past_its_cap_is_closed_by_the_loop() -> None:
    long_block = "<search> q </search>\n\n<information>" + "x" * 40 + "</information>\n\n" + ANSWER
    engine = ScriptedEngine([script(long_block), script(ANSWER)])
    result, _, _ = run(engine, config(policy=NeverPolicy(), max_information_tokens=10))
    assert result.searches[0].information == "x" * 10
    assert result.engine_requests == 2 and "req-1" in engine.aborted
    assert "a search query or self-filled information was cut by the token budget" in result.notes
    assert result.transcript.startswith(
        "<search> q </search>\n\n<information>" + "x" * 10 + "</information>\n\n"
    )


def test_max_turns_cuts_the_request_where_the_model_searches_once_more() -> None:
    engine = ScriptedEngine([script(TWO + ANSWER), script(" Paris </answer>")])
    result, _, _ = run(engine, config(policy=NeverPolicy(), max_turns=1))
    assert len(result.searches) == 1 and result.engine_requests == 2
    assert "req-1" in engine.aborted and result.answer == "Paris"


def test_a_counterfactual_branch_counts_its_own_requests() -> None:
    engine = ScriptedEngine(
        responder=lambda call: script(ANSWER) if call.request_id != "req-1" else script(ONE + ANSWER)
    )
    result, _, _ = run(engine, config(policy=NeverPolicy(), counterfactual=True))
    (branch,) = result.counterfactuals
    assert result.engine_requests == 1
    assert branch.engine_requests == 1 and branch.answer == "Paris"
    assert result.trace()["counterfactuals"][0]["engine_requests"] == 1


def test_search_events_come_before_the_text_after_their_query() -> None:
    engine = ScriptedEngine([script(ONE + ANSWER)])
    events, _ = collect(engine, config(policy=NeverPolicy()), SearchService([FakeBackend()]))
    decided = next(i for i, e in enumerate(events) if isinstance(e, SearchDecided))
    before = "".join(e.text for e in events[:decided] if isinstance(e, TextDelta))
    assert before.endswith("</search>") and "<information>" not in before


class _CountedTokenizer(CharTokenizer):
    def __len__(self) -> int:
        return 50_000


def test_over_a_remote_engine_the_cut_closes_the_upstream_stream() -> None:
    """Remote engine mode: aborting is closing the HTTP stream, at once, not when collected."""
    trajectory = ONE + ANSWER
    sent: list[int] = []
    closed: list[bool] = []

    def sse(text: str, finish: str | None) -> bytes:
        choice = {"text": text, "token_ids": [ord(c) + 10 for c in text], "finish_reason": finish}
        return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()

    class FirstRequest(httpx.AsyncByteStream):
        """The upstream's stream of the first request; closing the response closes it."""

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for i, c in enumerate(trajectory):
                sent.append(i)
                yield sse(c, "stop" if i == len(trajectory) - 1 else None)
                await asyncio.sleep(0)

        async def aclose(self) -> None:
            closed.append(True)

    closed_at_resume: list[bool] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if not sent:
            return httpx.Response(200, stream=FirstRequest())
        closed_at_resume.append(bool(closed))
        return httpx.Response(200, content=sse(ANSWER, "stop") + b"data: [DONE]\n\n")

    async def main():
        engine = RemoteEngine(RemoteEngineConfig("http://remote/v1", "tok"), _CountedTokenizer(), "m", 4096)
        engine._client = httpx.AsyncClient(
            transport=httpx.MockTransport(handler), base_url="http://remote/v1"
        )
        loop = SelfSearchLoop(
            engine,
            SearchService([FakeBackend()]),
            config(policy=AlwaysPolicy()),
            engine.tokenizer.encode(PROMPT),
            "r",
        )
        try:
            return [event async for event in loop.run()]
        finally:
            await engine.shutdown()

    events = asyncio.run(main())
    result = events[-1].result
    # The first stream was closed as soon as the search was decided, long before its end.
    assert closed == [True] and len(sent) < len(trajectory) and closed_at_resume == [True]
    assert result.engine_requests == 2 and result.answer == "Paris"
    assert INFO in result.transcript and "Paris is the capital." not in result.transcript
