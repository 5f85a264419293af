"""Self-search chat completions over HTTP, in process, on a scripted engine.

The app runs with its lifespan behind `httpx.ASGITransport`; the engine answers each call from
a `responder` that reads the call's stop strings (which step of the protocol it is) and, where
trajectories must differ, the request id of the trajectory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

import server.app
from router.engine.default_model import DEFAULT_MODEL_NAME
from router.search.base import Document
from router.search.service import SearchService
from server.app import create_app
from server.settings import ServeSettings
from tests.scripted_engine import Call, Script, ScriptedEngine, script

MODEL = DEFAULT_MODEL_NAME
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "What is the capital of France?"}]

NATIVE_STOPS = ("</answer>",)  # `</search>` is watched in the stream, not a stop (the single pass)
GUIDED_QUERY_STOPS = ("</search>", "\n")
GUIDED_ANSWER_STOPS = ("</answer>", "\n", "</")
FILL_STOPS = ("</information>",)

DOCS = [
    Document(
        "Paris", "Paris is the capital of France.", url="https://en.wikipedia.org/wiki/Paris", source="fake"
    ),
    Document(
        "Paris (disambiguation)",
        "Paris may refer to a city.",
        url="https://en.wikipedia.org/wiki/Paris",
        source="fake",
    ),
    Document("France", "France is a country.", url="https://en.wikipedia.org/wiki/France", source="fake"),
]
INFO = (
    "Doc 1(Title: Paris) Paris is the capital of France.\n"
    "Doc 2(Title: Paris (disambiguation)) Paris may refer to a city.\n"
    "Doc 3(Title: France) France is a country."
)

SEARCH_TURN = "<think>Look it up.</think><search> capital of France </search>"
ANSWER_TURN = "<answer> Paris </answer>"
FILL = "Paris is the capital.</information>"


class FakeBackend:
    name = "fake"

    def __init__(self, docs: list[Document] = DOCS) -> None:
        self.docs = docs
        self.queries: list[str] = []

    async def search(self, query: str, k: int) -> list[Document]:
        self.queries.append(query)
        return self.docs[:k]

    async def aclose(self) -> None:
        return None


def trajectory(call: Call) -> str:
    return call.request_id.rsplit("-", 1)[0]


class Responder:
    """Native and guided protocol steps, by the call's stop strings.

    `answers[i]` is the answer of the i-th trajectory to call the engine (cycled); native
    trajectories search `searches` times before answering.
    """

    def __init__(self, answers: tuple[str, ...] = ("Paris",), searches: int = 1) -> None:
        self.answers = answers
        self.searches = searches
        self.order: list[str] = []

    def answer_of(self, call: Call) -> str:
        tid = trajectory(call)
        if tid not in self.order:
            self.order.append(tid)
        return self.answers[self.order.index(tid) % len(self.answers)]

    def __call__(self, call: Call) -> Script:
        stop = call.options.stop
        answer = self.answer_of(call)
        if stop == NATIVE_STOPS:
            done = call.prompt_text.count("\n\n<information>")
            return script(SEARCH_TURN if done < self.searches else f"<answer> {answer} </answer>")
        if stop == FILL_STOPS:
            return script(FILL)
        if stop == GUIDED_QUERY_STOPS:
            return script(" capital of France</search>")
        if stop == GUIDED_ANSWER_STOPS:
            return script(f" {answer} </answer>")
        return script("Hello there")  # plain generation


def run_app(
    engine: ScriptedEngine,
    body: Callable[[httpx.AsyncClient], Awaitable[Any]],
    backend: FakeBackend | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
    **settings: Any,
) -> Any:
    values: dict[str, Any] = {
        "warmup": False,
        "search": "none",
        "search_mode": "native",
        "max_turns": 3,
        "max_votes": 4,
    }
    values.update(settings)
    if backend is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(
            server.app,
            "build_search_service",
            lambda s, observer=None: SearchService([backend], timeout_s=s.search_timeout),
        )
    app = create_app(ServeSettings(**values), engine_factory=lambda s: engine)

    async def main() -> Any:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
            ) as client,
        ):
            return await body(client)

    return asyncio.run(main())


def post(engine: ScriptedEngine, payload: dict[str, Any], **kwargs: Any) -> httpx.Response:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(CHAT, json=payload)

    return run_app(engine, body, **kwargs)


def post_both(
    engine: ScriptedEngine, payload: dict[str, Any], **kwargs: Any
) -> tuple[httpx.Response, httpx.Response, list[Call], list[Call]]:
    """The same request without and with streaming, on one app; the engine calls of each."""
    calls: list[list[Call]] = []

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        plain = await client.post(CHAT, json=payload)
        calls.append(list(engine.calls))
        streamed = await client.post(
            CHAT, json={**payload, "stream": True, "stream_options": {"include_usage": True}}
        )
        calls.append(engine.calls[len(calls[0]) :])
        return plain, streamed

    plain, streamed = run_app(engine, body, **kwargs)
    return plain, streamed, calls[0], calls[1]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def sse_events(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[Any] = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def usage_of(calls: list[Call], completion: int) -> dict[str, int]:
    prompt = sum(len(c.prompt) for c in calls)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def loop_usage(usage: dict[str, int]) -> dict[str, int]:
    """The standard usage fields; the protocol's own prompt tokens (an extension) are
    reported beside them, a positive share of the first engine call's prompt."""
    assert 0 < usage["protocol_prompt_tokens"] < usage["prompt_tokens"]
    # OpenAI's breakdown: the completion tokens that were not the answer's call.
    assert 0 <= usage["completion_tokens_details"]["reasoning_tokens"] <= usage["completion_tokens"]
    return {
        k: v for k, v in usage.items() if k not in ("protocol_prompt_tokens", "completion_tokens_details")
    }


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


# ----- non-streamed ---------------------------------------------------------------------------


def test_response_shape_with_an_external_search(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine(responder=Responder())
    backend = FakeBackend()
    response = post(engine, chat(self_search={"policy": "always"}), backend=backend, monkeypatch=monkeypatch)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    message = choice["message"]
    assert message["role"] == "assistant"
    assert message["content"] == "Paris"
    transcript = SEARCH_TURN + f"\n\n<information>{INFO}</information>\n\n" + ANSWER_TURN
    assert message["reasoning"] == transcript
    assert choice["finish_reason"] == "stop"
    assert backend.queries == ["capital of France"]

    trace = choice["self_search"]
    totals = (trace["external_calls"], trace["internal_fills"], trace["fallbacks"], trace["turns"])
    assert totals == (1, 0, 0, 1)
    assert trace["answered"] is True
    (search,) = trace["searches"]
    assert search["query"] == "capital of France"
    assert search["decision"] == "external"
    assert search["reason"] == "policy always searches externally"
    assert search["policy"] == "always"
    assert search["backend"] == "fake"
    assert search["fallback"] is None
    assert isinstance(search["latency_s"], float) and search["latency_s"] >= 0
    assert search["information"] == INFO
    entropy = search["entropy"]
    assert {"mean", "max", "min_prob", "ssrl", "tokens", "kind", "per_token"} <= set(entropy)
    assert {"lower", "upper", "per_token_lower", "per_token_upper"} <= set(entropy)
    assert entropy["tokens"] == len("capitalofFrance")
    assert entropy["min_prob"] == pytest.approx(0.9)
    # The default estimator, and both bounds around it (the engine states its vocabulary).
    assert entropy["kind"] == "topk_gaussian_tail"
    assert entropy["lower"]["mean"] <= entropy["mean"] <= entropy["upper"]["mean"]
    assert len(entropy["per_token_upper"]) == entropy["tokens"]
    assert [(d["title"], d["url"], d["snippet"]) for d in search["documents"]] == [
        (d.title, d.url, d.text) for d in DOCS
    ]

    # One citation per distinct external URL, over the answer.
    assert message["annotations"] == [
        {
            "type": "url_citation",
            "url_citation": {"url": url, "title": title, "start_index": 0, "end_index": len("Paris")},
        }
        for url, title in [
            ("https://en.wikipedia.org/wiki/Paris", "Paris"),
            ("https://en.wikipedia.org/wiki/France", "France"),
        ]
    ]
    # Usage: every engine call's prompt, every generated token.
    assert len(engine.calls) == 2
    assert loop_usage(body["usage"]) == usage_of(engine.calls, len(SEARCH_TURN) + len(ANSWER_TURN))
    # The search turn was the model's reasoning; the call that wrote the answer was not.
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": len(SEARCH_TURN)}
    # The second call continues the first: its prompt ends with the inserted block.
    assert engine.calls[1].prompt_text == engine.calls[0].prompt_text + transcript[: -len(ANSWER_TURN)]


def test_without_a_backend_an_external_decision_falls_back() -> None:
    engine = ScriptedEngine(responder=Responder())
    response = post(engine, chat(self_search={"policy": "always"}))
    choice = response.json()["choices"][0]
    trace = choice["self_search"]
    (search,) = trace["searches"]
    assert search["decision"] == "external"
    assert search["fallback"] == "no search backend is configured"
    assert search["documents"] == []
    assert search["information"] == FILL.removesuffix("</information>")
    assert (trace["external_calls"], trace["internal_fills"], trace["fallbacks"]) == (0, 1, 1)
    assert "annotations" not in choice["message"] or choice["message"]["annotations"] == []
    assert [c.options.stop for c in engine.calls] == [NATIVE_STOPS, FILL_STOPS, NATIVE_STOPS]
    completion = len(SEARCH_TURN) + len(FILL) + len(ANSWER_TURN)
    assert loop_usage(response.json()["usage"]) == usage_of(engine.calls, completion)


def test_server_default_policy_reads_the_entropy() -> None:
    # threshold tau 4.85 on the max entropy by default; the scripted tokens' entropy is far below it.
    engine = ScriptedEngine(responder=Responder())
    trace = post(engine, chat()).json()["choices"][0]["self_search"]
    (search,) = trace["searches"]
    assert search["decision"] == "internal"
    assert search["policy"] == "threshold"
    assert search["reason"].startswith("max entropy")
    assert search["reason"].endswith("<= tau 4.850")


def test_request_overrides_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine(responder=Responder())
    response = post(
        engine, chat(self_search={"threshold": 0.1}), backend=FakeBackend(), monkeypatch=monkeypatch
    )
    (search,) = response.json()["choices"][0]["self_search"]["searches"]
    assert search["decision"] == "external"
    assert search["reason"].endswith("> tau 0.100")


def test_disabled_self_search_is_plain_generation() -> None:
    engine = ScriptedEngine(responder=Responder())
    response = post(engine, chat(self_search={"enabled": False}))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "Hello there"
    assert "reasoning" not in choice["message"]
    assert "self_search" not in choice
    (call,) = engine.calls
    assert call.options.stop == () and call.options.logprobs is None
    chat_text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in USER)
    assert call.prompt_text == chat_text + "<|assistant|>"


@pytest.mark.parametrize("with_question", [True, False])
def test_guided_searches_send_the_question_as_the_server_says(
    with_question: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = ScriptedEngine(responder=Responder())
    backend = FakeBackend()
    payload = chat(self_search={"mode": "guided", "policy": "always"})
    response = post(
        engine, payload, backend=backend, monkeypatch=monkeypatch, search_with_question=with_question
    )
    assert response.status_code == 200, response.text
    question = USER[-1]["content"]
    (search,) = response.json()["choices"][0]["self_search"]["searches"]
    # --search-with-question: the backend gets the query followed by the user's question.
    sent = f"capital of France {question}" if with_question else "capital of France"
    assert backend.queries == [sent]
    assert search["sent_query"] == (sent if with_question else None)
    # Either way the answer turn reads the question again right before `<answer>`.
    assert engine.calls[-1].prompt_text.endswith(f"Question: {question}\n<answer>")


def test_guided_mode_over_http() -> None:
    engine = ScriptedEngine(responder=Responder())
    response = post(engine, chat(self_search={"mode": "guided", "policy": "never"}))
    message = response.json()["choices"][0]["message"]
    assert message["content"] == "Paris"
    assert message["reasoning"] == (
        "<search> capital of France </search>\n\n<information>Paris is the capital."
        # Guided mode writes the user's question again before the answer (router.prompts).
        "</information>\n\nQuestion: What is the capital of France?\n<answer> Paris </answer>"
    )
    first = engine.calls[0]
    assert first.options.stop == GUIDED_QUERY_STOPS
    assert first.prompt_text.endswith("<|assistant|><search>")
    # Guided mode shows a worked example before the question.
    assert "<|user|>Who wrote the novel Oliver Twist?" in first.prompt_text


def test_max_tokens_bounds_the_trajectory() -> None:
    engine = ScriptedEngine(responder=Responder())
    response = post(engine, chat(max_tokens=10))
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["reasoning"] == SEARCH_TURN[:10]
    assert response.json()["usage"]["completion_tokens"] == 10
    assert choice["self_search"]["answered"] is False


# ----- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extension", "param"),
    [
        ({"bogus": 1}, "self_search.bogus"),
        ({"policy": "bogus"}, "self_search.policy"),
        ({"max_turns": 4}, "self_search.max_turns"),
        ({"votes": 5}, "self_search.votes"),
        ({"threshold": "abc"}, "self_search.threshold"),
        ({"policy": "budget"}, "self_search.policy"),  # budget without a budget
        ({"mode": "freestyle"}, "self_search.mode"),
        ({"docs_per_search": 0}, "self_search.docs_per_search"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_extension_values_are_400(extension: dict[str, Any], param: str, stream: bool) -> None:
    engine = ScriptedEngine(responder=Responder())
    response = post(engine, chat(self_search=extension, stream=stream))
    assert_error(response, 400, param)
    assert engine.calls == []


def test_extension_values_within_the_caps_are_accepted() -> None:
    engine = ScriptedEngine(responder=Responder())
    response = post(engine, chat(self_search={"max_turns": 3, "votes": 1, "threshold": 2}))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_with_self_search_is_400(stream: bool) -> None:
    engine = ScriptedEngine(responder=Responder())
    assert_error(post(engine, chat(logprobs=True, stream=stream)), 400, "logprobs")
    assert engine.calls == []


def test_logprobs_without_self_search_are_allowed() -> None:
    engine = ScriptedEngine(responder=Responder())
    response = post(engine, chat(logprobs=True, self_search={"enabled": False}))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["logprobs"]["content"]


# ----- several trajectories -------------------------------------------------------------------


def test_n_2_runs_two_independent_trajectories() -> None:
    engine = ScriptedEngine(responder=Responder(answers=("Paris", "Lyon")))
    response = post(engine, chat(n=2))
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    answers = {c["message"]["content"] for c in choices}
    assert answers == {"Paris", "Lyon"}
    for c in choices:
        assert c["message"]["reasoning"].endswith(f"<answer> {c['message']['content']} </answer>")
        assert c["self_search"]["turns"] == 1
    # Each trajectory made its own calls (search, fill, answer) under its own id.
    by_trajectory: dict[str, int] = {}
    for call in engine.calls:
        by_trajectory[trajectory(call)] = by_trajectory.get(trajectory(call), 0) + 1
    assert sorted(by_trajectory.values()) == [3, 3]
    completion = (
        2 * (len(SEARCH_TURN) + len(FILL)) + len("<answer> Paris </answer>") + len("<answer> Lyon </answer>")
    )
    assert loop_usage(response.json()["usage"]) == usage_of(engine.calls, completion)


def test_votes_pick_the_majority_answer() -> None:
    engine = ScriptedEngine(responder=Responder(answers=("Paris", "Lyon", "paris.")))
    response = post(engine, chat(self_search={"votes": 3}))
    (choice,) = response.json()["choices"]
    vote = choice["self_search"]["vote"]
    assert vote["votes"] == 3
    assert vote["answer"] == "paris"
    assert vote["counts"] == {"paris": 2, "lyon": 1}
    assert len(vote["samples"]) == 3
    assert sorted(s["answer"] for s in vote["samples"]) == ["Lyon", "Paris", "paris."]
    assert all("searches" in s and s["turns"] == 1 for s in vote["samples"])
    assert vote["samples"][vote["winner"]]["answer"] == choice["message"]["content"]
    assert choice["message"]["content"] in ("Paris", "paris.")
    assert len({trajectory(c) for c in engine.calls}) == 3
    # Usage counts every sampled trajectory, not only the winner.
    completion = 3 * (len(SEARCH_TURN) + len(FILL)) + sum(
        len(f"<answer> {a} </answer>") for a in ("Paris", "Lyon", "paris.")
    )
    assert loop_usage(response.json()["usage"]) == usage_of(engine.calls, completion)


# ----- streamed -------------------------------------------------------------------------------


def _choice_stream(events: list[Any], index: int = 0) -> list[dict[str, Any]]:
    return [c for e in events[:-1] for c in e["choices"] if c["index"] == index]


@pytest.mark.parametrize("mode", ["native", "guided"])
def test_stream_carries_the_same_trajectory(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine(responder=Responder(searches=2))
    payload = chat(self_search={"mode": mode, "policy": "always"})
    plain, streamed, plain_calls, stream_calls = post_both(
        engine, payload, backend=FakeBackend(), monkeypatch=monkeypatch, guided_searches=2
    )
    expected = plain.json()["choices"][0]
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    assert all(isinstance(e, dict) for e in events[:-1])
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert len({e["id"] for e in events[:-1]}) == 1
    chunks = _choice_stream(events)
    assert chunks[0]["delta"] == {"role": "assistant", "content": ""}

    reasoning = "".join(c["delta"].get("reasoning") or "" for c in chunks)
    content = "".join(c["delta"].get("content") or "" for c in chunks)
    assert reasoning == expected["message"]["reasoning"]
    assert content == expected["message"]["content"] == "Paris"
    assert expected["message"]["reasoning"].count("<information>") == 2

    kinds = [c["self_search"]["type"] for c in chunks if "self_search" in c]
    assert kinds == ["search", "search", "trace"]
    final = chunks[-1]
    assert final["self_search"]["type"] == "trace"
    assert final["finish_reason"] == "stop"
    trace = {k: v for k, v in final["self_search"].items() if k != "type"}
    for record in trace["searches"] + expected["self_search"]["searches"]:
        record.pop("latency_s")
    plain_trace = expected["self_search"]
    assert trace == plain_trace
    assert final["annotations"] == expected["message"]["annotations"]
    # Each search event arrives after its query closed and before its information block.
    text = ""
    searches = 0
    for c in chunks:
        if c.get("self_search", {}).get("type") == "search":
            assert text.endswith("</search>")
            assert text.count("\n\n<information>") == searches
            assert c["self_search"]["search"]["query"] == "capital of France"
            searches += 1
        text += c["delta"].get("reasoning") or ""
    # Usage rides on the last chunk and matches the non-streamed request.
    assert events[-2]["choices"] == []
    assert events[-2]["usage"] == plain.json()["usage"]
    assert len(plain_calls) == len(stream_calls)


def test_guided_stream_sends_the_answer_as_it_is_written() -> None:
    long_answer = "Paris, the capital city of France"
    engine = ScriptedEngine(responder=Responder(answers=(long_answer,)))
    payload = chat(stream=True, self_search={"mode": "guided", "policy": "never"})
    events = sse_events(post(engine, payload, max_answer_tokens=64))
    chunks = _choice_stream(events)
    assert chunks[-1]["finish_reason"] == "stop"
    pieces = [c["delta"]["content"] for c in chunks if c["delta"].get("content")]
    assert len(pieces) > 1
    assert "".join(pieces) == long_answer
    # Every answer piece is also transcript text, in the same chunk.
    assert all(c["delta"].get("reasoning") for c in chunks if c["delta"].get("content"))


def test_stream_n_2_keeps_trajectories_apart() -> None:
    engine = ScriptedEngine(responder=Responder(answers=("Paris", "Lyon")))
    events = sse_events(post(engine, chat(n=2, stream=True)))
    assert events[-1] == "[DONE]"
    contents = {}
    for index in (0, 1):
        chunks = _choice_stream(events, index)
        reasoning = "".join(c["delta"].get("reasoning") or "" for c in chunks)
        content = "".join(c["delta"].get("content") or "" for c in chunks)
        assert reasoning.endswith(f"<answer> {content} </answer>")
        assert reasoning.count("<search>") == 1
        assert [c["self_search"]["type"] for c in chunks if "self_search" in c] == ["search", "trace"]
        contents[index] = content
    assert set(contents.values()) == {"Paris", "Lyon"}


def test_stream_with_votes_sends_the_chosen_trajectory() -> None:
    engine = ScriptedEngine(responder=Responder(answers=("Paris", "Lyon", "Paris")))
    events = sse_events(post(engine, chat(stream=True, self_search={"votes": 3})))
    chunks = _choice_stream(events)
    content = "".join(c["delta"].get("content") or "" for c in chunks)
    reasoning = "".join(c["delta"].get("reasoning") or "" for c in chunks)
    assert content == "Paris"
    assert reasoning.endswith("<answer> Paris </answer>")
    final = chunks[-1]
    assert final["self_search"]["type"] == "trace"
    assert final["self_search"]["vote"]["counts"] == {"paris": 2, "lyon": 1}
