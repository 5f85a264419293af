"""One cap on a request's total work (--max-request-tokens): prompt + completion tokens of every
sequence it runs (n choices, self-search votes, counterfactual branches), checked after the
prompt is tokenised and before any engine call.

The arithmetic is pure (`server.serving`); the routes run in process on the scripted engine
(one token per character, a 4,096-token context), whose recorded calls show that a refused
request reached no engine.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from router.loop import LoopConfig
from router.policies import make_policy
from server.errors import APIError
from server.serving import (
    check_forwarded_work,
    check_request_work,
    forwarded_work_bound,
    request_work,
    request_work_cap,
)
from server.serving_self_search import counterfactual_branches
from tests.scripted_engine import ScriptedEngine
from tests.unit.test_self_search_http import CHAT, MODEL, FakeBackend, Responder, run_app

CONTEXT = 4096  # the scripted engine's max_model_len
COMPLETIONS = "/v1/completions"


# ----- the arithmetic -----------------------------------------------------------------------


def test_work_is_every_sequence_holding_the_prompt_and_its_completion() -> None:
    assert request_work(16, 8, 7_100, 64) == 16 * 8 * 7_164 == 916_992
    assert request_work(1, 1, 10, 5) == 15
    # Counterfactual branches are further copies of a trajectory: votes x (1 + branches).
    assert request_work(2, 3 * (1 + 3), 100, 28) == 2 * 12 * 128


def test_the_cap_defaults_to_max_n_contexts_and_is_never_below_one() -> None:
    assert request_work_cap(None, 16, 8192) == 131_072
    assert request_work_cap(None, None, 8192) is None  # no --max-n: nothing to derive it from
    assert request_work_cap(50_000, 16, 8192) == 50_000
    # Below one context it would refuse what the context allows (and every forwarded request).
    assert request_work_cap(100, 16, 8192) == 8192


def refusal(**kwargs: Any) -> APIError:
    with pytest.raises(APIError) as info:
        check_request_work(**kwargs)
    assert info.value.status == 400
    assert info.value.code == "request_work_exceeded"
    return info.value


def test_the_refusal_states_the_figure_the_formula_and_the_cap() -> None:
    error = refusal(cap=131_072, n=16, prompt_tokens=7_100, completion_tokens=64, votes=8)
    assert error.param == "self_search.votes"
    assert error.message == (
        "This request may use up to 916,992 tokens of work (n 16 x votes 8 x (prompt 7,100 + "
        "completion 64)); this server allows 131,072 per request (--max-request-tokens). Lower "
        "self_search.votes, n or max_tokens, or shorten the prompt."
    )


def test_at_the_cap_or_without_one_nothing_is_refused() -> None:
    check_request_work(cap=16 * 8 * 164, n=16, prompt_tokens=100, completion_tokens=64, votes=8)
    check_request_work(cap=None, n=10**6, prompt_tokens=10**6, completion_tokens=10**6, votes=10**6)


def test_counterfactual_branches_count_and_are_named() -> None:
    error = refusal(cap=1000, n=1, prompt_tokens=200, completion_tokens=100, branches=3)
    assert error.param == "self_search.counterfactual"
    assert "1,200 tokens of work (n 1 x (1 + 3 counterfactual branches) x (prompt 200 + completion 100))" in (
        error.message
    )
    assert "turn self_search.counterfactual off" in error.message


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 4, "prompt_tokens": 300, "completion_tokens": 10}, "n"),
        ({"n": 1, "prompt_tokens": 300, "completion_tokens": 900}, "max_tokens"),
        ({"n": 1, "prompt_tokens": 900, "completion_tokens": 300}, "messages"),
        ({"n": 1, "prompt_tokens": 900, "completion_tokens": 300, "prompt_param": "prompt"}, "prompt"),
    ],
)
def test_param_names_the_field_to_lower(kwargs: dict[str, Any], param: str) -> None:
    assert refusal(cap=1000, **kwargs).param == param


def test_several_prompts_are_summed_and_said_so() -> None:
    error = refusal(cap=1000, n=2, prompt_tokens=600, completion_tokens=48, prompts=3, prompt_param="prompt")
    assert "n 2 x (3 prompts 600 + completions 48)" in error.message
    assert error.param == "n"


def loop_config(mode: str, counterfactual: bool, max_turns: int = 3, guided_searches: int = 1) -> LoopConfig:
    return LoopConfig(
        mode=mode,  # type: ignore[arg-type]
        policy=make_policy("never", tau=None, aggregate="max", budget=None),
        max_turns=max_turns,
        guided_searches=guided_searches,
        counterfactual=counterfactual,
    )


def test_a_trajectory_branches_at_most_once_per_search() -> None:
    # The real ceiling of issue 29: 2x the trajectory in guided mode, 4x natively (defaults).
    assert counterfactual_branches(loop_config("guided", True)) == 1
    assert counterfactual_branches(loop_config("native", True)) == 3
    assert counterfactual_branches(loop_config("guided", True, max_turns=2, guided_searches=5)) == 2
    assert counterfactual_branches(loop_config("native", False)) == 0
    assert counterfactual_branches(loop_config("guided", False)) == 0


# ----- forwarded requests (vLLM's serving layer: the prompt is not tokenised first) ---------


def test_a_forwarded_sequence_counts_a_whole_context_unless_its_prompt_is_known() -> None:
    assert forwarded_work_bound(None, None, 8192) == 8192
    assert forwarded_work_bound(4, 16, 8192) == 4 * 8192  # the prompt may fill what 16 leaves
    assert forwarded_work_bound(4, 16, 8192, prompt_tokens=100) == 4 * 116
    assert forwarded_work_bound(2, None, 8192, prompt_tokens=100) == 2 * 8192


def test_a_forwarded_request_gets_the_same_400() -> None:
    check_forwarded_work(request_work_cap(None, 16, 8192), 16, None, 8192)  # within --max-n: served
    check_forwarded_work(None, 10**6, None, 8192)
    with pytest.raises(APIError) as info:
        check_forwarded_work(4 * 8192, 5, 16, 8192, tokens_param="max_completion_tokens")
    error = info.value
    assert (error.status, error.param, error.code) == (400, "n", "request_work_exceeded")
    assert "40,960 tokens of work (n 5 x (prompt + max_completion_tokens, up to the context 8,192))" in (
        error.message
    )
    assert "allows 32,768 per request (--max-request-tokens). Lower n." in error.message
    with pytest.raises(APIError) as info:
        check_forwarded_work(1000, 1, 2000, 8192, prompt_tokens=100)
    assert info.value.param == "max_tokens"
    assert "(n 1 x (prompt 100 + completion 2,000))" in info.value.message


# ----- over HTTP: refused before any engine call ---------------------------------------------


def long_user(chars: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Which city? " + "x" * chars}]


def post(
    path: str, payload: dict[str, Any], engine: ScriptedEngine | None = None, **settings: Any
) -> tuple[httpx.Response, ScriptedEngine]:
    engine = engine or ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(path, json=payload)

    return run_app(engine, body, **settings), engine


def assert_refused(response: httpx.Response, engine: ScriptedEngine, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "request_work_exceeded")
    assert engine.calls == []  # refused before any engine work
    message: str = error["message"]
    return message


@pytest.mark.parametrize("stream", [False, True])
def test_votes_over_the_default_cap_are_refused_before_generating(stream: bool) -> None:
    # n 16 x votes 8 x (a 2,000-character prompt + 64): far over --max-n 16 x 4,096 = 65,536.
    payload = {
        "model": MODEL,
        "messages": long_user(2000),
        "n": 16,
        "max_tokens": 64,
        "stream": stream,
        "self_search": {"enabled": True, "votes": 8},
    }
    response, engine = post(CHAT, payload, max_votes=8)
    message = assert_refused(response, engine, "self_search.votes")
    assert "(n 16 x votes 8 x (prompt " in message and " + completion 64))" in message
    assert "this server allows 65,536 per request (--max-request-tokens)" in message


def test_votes_within_the_cap_are_served() -> None:
    payload = {
        "model": MODEL,
        "messages": long_user(200),
        "n": 2,
        "max_tokens": 64,
        "self_search": {"enabled": True, "votes": 2},
    }
    response, engine = post(CHAT, payload, max_request_tokens=2 * 2 * CONTEXT)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2 and engine.calls


def test_counterfactual_branches_count_against_the_cap() -> None:
    # Natively with max_turns 3 a trajectory may run 3 branches: 4 sequences of 2,000+ tokens
    # exceed 5,000, where the trajectory alone does not.
    payload = {
        "model": MODEL,
        "messages": long_user(200),
        "max_tokens": 2000,
        "self_search": {"enabled": True, "counterfactual": True},
    }
    response, engine = post(CHAT, payload, max_request_tokens=5000)
    message = assert_refused(response, engine, "self_search.counterfactual")
    assert "(n 1 x (1 + 3 counterfactual branches) x (prompt " in message
    no_branches = {**payload, "self_search": {"enabled": True}}
    response, engine = post(CHAT, no_branches, max_request_tokens=5000)
    assert response.status_code == 200, response.text
    # With room for them, the branches run.
    response, engine = post(CHAT, payload, max_request_tokens=4 * CONTEXT)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("stream", [False, True])
def test_plain_chat_counts_the_prompt_of_every_choice(stream: bool) -> None:
    payload = {"model": MODEL, "messages": long_user(1500), "n": 8, "max_tokens": 16, "stream": stream}
    response, engine = post(CHAT, payload, self_search=False, max_request_tokens=8192)
    message = assert_refused(response, engine, "n")
    assert "(n 8 x (prompt " in message and "+ completion 16))" in message
    response, engine = post(CHAT, {**payload, "n": 2}, self_search=False, max_request_tokens=8192)
    assert response.status_code == 200, response.text


def test_completions_count_every_prompt_times_n() -> None:
    payload = {"model": MODEL, "prompt": ["a" * 1500, "b" * 1500, "c" * 1500], "n": 2, "max_tokens": 8}
    engine = ScriptedEngine(responder=Responder())
    response, _ = post(COMPLETIONS, payload, engine, self_search=False, max_request_tokens=8192)
    message = assert_refused(response, engine, "n")
    assert "(n 2 x (3 prompts 4,500 + completions 24))" in message
    response, _ = post(COMPLETIONS, {**payload, "n": 1}, engine, self_search=False, max_request_tokens=8192)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3


def test_a_single_sequence_that_fits_the_context_is_never_refused() -> None:
    # A cap set below one context is raised to one context.
    payload = {"model": MODEL, "messages": long_user(3000), "max_tokens": 500}
    response, _ = post(CHAT, payload, self_search=False, max_request_tokens=100)
    assert response.status_code == 200, response.text


def test_the_responses_web_search_route_is_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {
        "model": MODEL,
        "input": "Which city? " + "x" * 1500,
        "tools": [{"type": "web_search"}],
        "max_output_tokens": 500,
        "self_search": {"votes": 4},
    }
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/responses", json=payload)

    response = run_app(
        engine, body, backend=FakeBackend(), monkeypatch=monkeypatch, max_request_tokens=CONTEXT
    )
    message = assert_refused(response, engine, "self_search.votes")
    assert "+ completion 500))" in message and "max_output_tokens" in message
