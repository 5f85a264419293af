"""Request-level hardening (issue 13): seeds, unencodable text, the event loop under a big
prompt, --max-tokens-limit, one mapping of engine errors, and start-up validation.

The app runs in process on a scripted engine. `StrictEngine` refuses what vLLM refuses where
the scripted engine would not: a seed outside int64 (vLLM's msgpack encoder raises
`OverflowError`) and text UTF-8 cannot encode (the Hugging Face tokenizer raises `TypeError`,
msgpack `UnicodeEncodeError`), so a request that reaches it with either fails as it would on
vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from router.engine.base import (
    SEED_MAX,
    SEED_MIN,
    EngineRequestError,
    GenerationDelta,
    PromptTooLongError,
    SamplingOptions,
    offset_seed,
)
from router.engine.default_model import DEFAULT_MODEL_NAME
from router.engine.hf_tokenizer import HFTokenizerEngine
from router.engine.remote_engine import RemoteEngine, RemoteEngineConfig
from server.app import create_app
from server.errors import APIError
from server.settings import ServeSettings
from tests.scripted_engine import Call, CharTokenizer, Script, ScriptedEngine, script

MODEL = DEFAULT_MODEL_NAME
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "What is the capital of France?"}]
NATIVE_STOPS = ("</answer>",)  # `</search>` is watched in the stream, not a stop (the single pass)


def respond(call: Call) -> Script:
    """Native self-search answers at once; anything else is plain text."""
    if call.options.stop == NATIVE_STOPS:
        return script("<answer> Paris </answer>")
    return script("Hello there")


class StrictTokenizer(CharTokenizer):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        text.encode("utf-8")  # as the Rust tokenizer: no lone surrogates
        return super().encode(text, add_special_tokens)


@dataclass
class StrictEngine(ScriptedEngine):
    async def generate(
        self, prompt: str | Sequence[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[GenerationDelta]:
        if options.seed is not None and not SEED_MIN <= options.seed <= SEED_MAX:
            raise OverflowError("int too big to convert")  # vLLM's msgpack encoder
        for stop in options.stop:
            stop.encode("utf-8")  # msgpack encodes strings as UTF-8
        async for delta in super().generate(prompt, options, request_id):
            yield delta


def strict_engine(**kwargs: Any) -> StrictEngine:
    return StrictEngine(responder=respond, tokenizer=StrictTokenizer(), **kwargs)


def make_app(engine: ScriptedEngine, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "warmup": False,
        "search": "none",
        "search_mode": "native",
        "self_search": False,
        "max_request_bytes": 1 << 20,
    }
    values.update(overrides)
    return create_app(ServeSettings(**values), engine_factory=lambda _: engine)


def run(engine: ScriptedEngine, body: Callable[[httpx.AsyncClient], Awaitable[Any]], **overrides: Any) -> Any:
    app = make_app(engine, **overrides)

    async def main() -> Any:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
            ) as client,
        ):
            return await body(client)

    return asyncio.run(main())


def raw(payload: Any) -> dict[str, Any]:
    """Request kwargs with the body as ASCII JSON: lone surrogates travel as `\\ud800` escapes
    (httpx's own `json=` would fail to encode them)."""
    return {"content": json.dumps(payload).encode(), "headers": {"content-type": "application/json"}}


def post(engine: ScriptedEngine, path: str, payload: Any, **overrides: Any) -> httpx.Response:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(path, **raw(payload))

    return run(engine, body, **overrides)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def sse_events(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def error_of(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    """(status, error) of an answer, or of the error event ending a 200 stream."""
    if response.status_code != 200:
        body = json.loads(response.content.decode("utf-8"))  # strict UTF-8
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return response.status_code, body["error"]
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1, events
    return 200, errors[0]


def assert_400(response: httpx.Response, param: str | None, code: str | None = None) -> dict[str, Any]:
    status, error = error_of(response)
    assert status == 400, response.text
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# ----- item 1: seeds ----------------------------------------------------------------------

SELF_SEARCH = {"self_search": {"enabled": True}}


def test_offset_seed_wraps_into_int64() -> None:
    assert offset_seed(None, 5) is None
    assert offset_seed(7, 3) == 10
    assert offset_seed(SEED_MAX, 1) == SEED_MIN
    assert offset_seed(SEED_MIN, -1) == SEED_MAX
    assert all(SEED_MIN <= offset_seed(SEED_MAX, k) <= SEED_MAX for k in range(0, 5000, 7))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (CHAT, chat(seed=2**64)),
        (CHAT, chat(seed=2**63)),
        (CHAT, chat(seed=-(2**63) - 1)),
        (CHAT, chat(seed=2**64, stream=True)),
        (CHAT, chat(seed=2**64, **SELF_SEARCH)),
        (CHAT, chat(seed=2**64, stream=True, **SELF_SEARCH)),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "seed": 2**64}),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "seed": 2**64, "stream": True}),
    ],
)
def test_seed_outside_int64_is_400(path: str, payload: dict[str, Any]) -> None:
    engine = strict_engine()
    assert_400(post(engine, path, payload), "seed", "invalid_value")
    assert engine.calls == []


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (CHAT, chat(seed=SEED_MAX, n=2, max_tokens=8)),
        (CHAT, chat(seed=SEED_MAX, n=2, max_tokens=8, stream=True)),
        (CHAT, chat(seed=SEED_MAX, n=2, self_search={"enabled": True, "votes": 2})),
        (CHAT, chat(seed=SEED_MAX, n=2, stream=True, self_search={"enabled": True, "votes": 2})),
        (COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"], "n": 2, "seed": SEED_MAX}),
    ],
)
def test_seed_at_the_bound_stays_in_range_with_offsets(path: str, payload: dict[str, Any]) -> None:
    engine = strict_engine()
    response = post(engine, path, payload)
    assert response.status_code == 200, response.text
    if payload.get("stream"):
        assert not [e for e in sse_events(response) if isinstance(e, dict) and "error" in e]
    seeds = [c.options.seed for c in engine.calls]
    assert seeds and all(s is not None and SEED_MIN <= s <= SEED_MAX for s in seeds)
    if path == CHAT and "self_search" in payload:
        # Four trajectories, each its own block of seeds: the first keeps it, the rest wrap.
        assert len(set(seeds)) == len(seeds) == 4
        assert seeds[0] == SEED_MAX and all(s < 0 for s in seeds[1:])
    else:
        assert SEED_MAX in seeds and SEED_MIN in seeds  # choice 0 keeps the seed, choice 1 wraps


# ----- item 2: unencodable text -----------------------------------------------------------

LONE = "\ud800"


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        (COMPLETIONS, {"model": MODEL, "prompt": "a\udfffb"}, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": ["fine", "a\udfffb"]}, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "stop": [LONE]}, "stop"),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "stop": LONE, "stream": True}, "stop"),
        (COMPLETIONS, {"model": LONE, "prompt": "a"}, "model"),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "user": LONE}, "user"),
        (CHAT, chat(model=LONE), "model"),
        (CHAT, chat(stop=[LONE]), "stop"),
        (CHAT, chat(stop=[LONE], **SELF_SEARCH), "stop"),
        (CHAT, chat(user=LONE), "user"),
        (CHAT, chat(messages=[{"role": "user", "content": "x\udc00"}]), "messages.0.content"),
        (CHAT, chat(messages=[{"role": "user", "content": "x\udc00"}], **SELF_SEARCH), "messages.0.content"),
        (
            CHAT,
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
            "messages.0.content.0.text",
        ),
        (CHAT, chat(messages=[{"role": "user", "content": "hi", "name": LONE}]), "messages.0.name"),
        (CHAT, chat(stream=True, stop=[LONE]), "stop"),
        ("/retrieve", {"queries": [LONE]}, "queries"),
    ],
)
def test_unencodable_text_is_400_in_utf8(path: str, payload: dict[str, Any], param: str) -> None:
    engine = strict_engine()
    error = assert_400(post(engine, path, payload), param, "invalid_value")
    assert "surrogate" in error["message"]
    assert engine.calls == []


def test_error_messages_never_carry_unencodable_text() -> None:
    error = APIError(404, f"The model `{LONE}` does not exist.", param=f"self_search.{LONE}")
    body = error.response().body  # rendering it raised UnicodeEncodeError before
    decoded = json.loads(body.decode("utf-8"))["error"]
    assert decoded["message"] == "The model `\\ud800` does not exist."
    assert decoded["param"] == "self_search.\\ud800"
    # A key that is itself unencodable: pydantic refuses the object, a 400 in UTF-8.
    assert_400(post(strict_engine(), CHAT, chat(self_search={LONE: 1})), "self_search")


# ----- item 3: the event loop under a big prompt --------------------------------------------


class GatedTokenizer(CharTokenizer):
    """Holds the first big encode until the test releases it (at most 5 s)."""

    def __init__(self, big: int) -> None:
        super().__init__()
        self.big = big
        self.started = threading.Event()
        self.release = threading.Event()
        self.released: bool | None = None
        self.big_encodes = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) >= self.big:
            self.big_encodes += 1
            if not self.started.is_set():
                self.started.set()
                # On the event loop (as before), nothing can release it: it times out.
                self.released = self.release.wait(timeout=5)
        return super().encode(text, add_special_tokens)


@pytest.mark.parametrize("route", ["chat", "self_search", "completions"])
def test_health_answers_while_a_big_prompt_is_tokenised(route: str) -> None:
    tokenizer = GatedTokenizer(big=5000)
    engine = ScriptedEngine(responder=respond, tokenizer=tokenizer, max_model_len=20_000)
    big = "x" * 6000
    path, payload = {
        "chat": (CHAT, chat(messages=[{"role": "user", "content": big}], max_tokens=4)),
        "self_search": (CHAT, chat(messages=[{"role": "user", "content": big}], **SELF_SEARCH)),
        "completions": (COMPLETIONS, {"model": MODEL, "prompt": big, "max_tokens": 4}),
    }[route]
    order: list[str] = []

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        async def big_request() -> httpx.Response:
            response = await client.post(path, json=payload)
            order.append("big")
            return response

        task = asyncio.create_task(big_request())
        assert await asyncio.to_thread(tokenizer.started.wait, 10)
        health = await client.get("/health")
        order.append("health")
        tokenizer.release.set()
        return health, await task

    health, response = run(engine, body)
    assert health.status_code == 200
    assert response.status_code == 200, response.text
    assert tokenizer.released is True  # /health was served while the tokenizer worked
    assert order == ["health", "big"]


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        (CHAT, chat(messages=[{"role": "user", "content": "y" * 2100}]), "messages"),
        (CHAT, chat(messages=[{"role": "user", "content": "y" * 2100}], **SELF_SEARCH), "messages"),
        (COMPLETIONS, {"model": MODEL, "prompt": "y" * 2100}, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": list(range(100, 140))}, "prompt"),
    ],
)
def test_text_too_long_by_its_length_is_400_before_tokenising(
    path: str, payload: dict[str, Any], param: str
) -> None:
    # 32 tokens x 64 characters per token at most: 2048 characters can never fit.
    tokenizer = GatedTokenizer(big=2000)
    engine = ScriptedEngine(responder=respond, tokenizer=tokenizer, max_model_len=32)
    engine.max_chars_per_token = 64  # type: ignore[attr-defined]
    assert_400(post(engine, path, payload), param, "context_length_exceeded")
    assert tokenizer.big_encodes == 0 and engine.calls == []


def test_hf_engines_bound_characters_per_token_by_their_vocabulary() -> None:
    class Vocab:
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, "Ġ" + "=" * 64: 1, "<|im_start|>": 2}

    engine = HFTokenizerEngine()
    engine._tokenizer = Vocab()
    assert engine.max_chars_per_token == 65


# ----- item 8: --max-tokens-limit -------------------------------------------------------------


def long_answers(call: Call) -> Script:
    if call.options.stop == NATIVE_STOPS:
        return script("<think>" + "z" * 300 + "</think><answer> Paris </answer>")
    return script("w" * 300)


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (CHAT, chat()),
        (CHAT, chat(max_tokens=None)),
        (CHAT, chat(stream=True)),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": None}),
    ],
)
def test_omitted_max_tokens_takes_the_limit_not_the_context(path: str, payload: dict[str, Any]) -> None:
    engine = ScriptedEngine(responder=long_answers)
    response = post(engine, path, payload, max_tokens_limit=32)
    assert response.status_code == 200, response.text
    assert [c.options.max_tokens for c in engine.calls] == [32]


def test_omitted_max_tokens_in_self_search_stays_within_the_limit() -> None:
    engine = ScriptedEngine(responder=long_answers)
    response = post(engine, CHAT, chat(n=2, **SELF_SEARCH), max_tokens_limit=32)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 2 * 32
    assert all(c.options.max_tokens <= 32 for c in engine.calls)


@pytest.mark.parametrize("stream", [False, True])
def test_votes_count_against_the_request_total(stream: bool) -> None:
    engine = ScriptedEngine(responder=long_answers)
    over = chat(n=16, stream=stream, self_search={"enabled": True, "votes": 8})
    error = assert_400(post(engine, CHAT, over, max_tokens_limit=32, max_n=16), "self_search.votes")
    # The one per-request cap (--max-request-tokens; default --max-n x the context, 16 x 4096)
    # counts every trajectory's prompt and completion: 128 x (prompt + 32).
    assert "tokens of work (n 16 x votes 8 x (prompt " in error["message"]
    assert " + completion 32))" in error["message"]
    assert "65,536" in error["message"]
    assert engine.calls == []
    # Within it (16 trajectories of prompt + 32): served, each within --max-tokens-limit.
    ok = post(
        engine, CHAT, chat(n=8, self_search={"enabled": True, "votes": 2}), max_tokens_limit=32, max_n=16
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] <= 512


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_beyond_the_context_is_400_with_or_without_self_search(stream: bool) -> None:
    engine = ScriptedEngine(responder=respond)
    plain = post(engine, CHAT, chat(max_tokens=10_000_000, stream=stream))
    searched = post(engine, CHAT, chat(max_tokens=10_000_000, stream=stream, **SELF_SEARCH))
    for response in (plain, searched):
        assert_400(response, "max_tokens", "context_length_exceeded")
    assert engine.calls == []


# ----- item 10: one mapping of engine errors ---------------------------------------------------


ROUTES = [
    ("plain", CHAT, chat(max_tokens=8)),
    ("self_search", CHAT, chat(**SELF_SEARCH)),
    ("completions", COMPLETIONS, {"model": MODEL, "prompt": "a"}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("exc", "status", "expected"),
    [
        (
            PromptTooLongError("too long for the engine"),
            400,
            {"type": "invalid_request_error", "code": "context_length_exceeded", "param": None},
        ),
        (
            EngineRequestError("temperature is bad", type="BadRequestError", param="temperature"),
            400,
            # One shape on every route: OpenAI's type and a string code, whatever the engine said.
            {"type": "invalid_request_error", "code": "invalid_value", "param": "temperature"},
        ),
    ],
)
def test_engine_errors_map_the_same_on_every_route(
    exc: Exception, status: int, expected: dict[str, Any], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(call: Call) -> Script:
        raise exc

    engine = ScriptedEngine(responder=refuse)
    caplog.set_level(logging.ERROR)
    for _, path, payload in ROUTES:
        response = post(engine, path, {**payload, "stream": stream})
        got_status, error = error_of(response)
        assert got_status == (200 if stream else status), response.text
        assert error["message"] == str(exc)
        assert {k: error[k] for k in expected} == expected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback logged


def test_remote_400_keeps_the_remotes_message_and_type() -> None:
    answers = {
        "vllm": httpx.Response(
            400,
            json={
                "error": {
                    "message": "This model's maximum context length is 64 tokens.",
                    "type": "BadRequestError",
                    "param": "max_tokens",
                    "code": 400,
                }
            },
        ),
        "text": httpx.Response(400, text="no json here"),
    }

    def engine_for(answer: httpx.Response) -> RemoteEngine:
        engine = RemoteEngine(RemoteEngineConfig("http://remote/v1", "tok"), [0] * 100, "m", 4096)
        engine._client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda request: answer), base_url="http://remote/v1"
        )
        return engine

    async def refusal(answer: httpx.Response) -> EngineRequestError:
        engine = engine_for(answer)
        with pytest.raises(EngineRequestError) as raised:
            async for _ in engine.generate([1, 2, 3], SamplingOptions(max_tokens=4), "r"):
                pass
        await engine.shutdown()
        return raised.value

    vllm = asyncio.run(refusal(answers["vllm"]))
    assert not isinstance(vllm, PromptTooLongError)
    assert (vllm.status, vllm.message, vllm.type, vllm.param, vllm.code) == (
        400,
        "This model's maximum context length is 64 tokens.",
        "BadRequestError",
        "max_tokens",
        "context_length_exceeded",
    )
    text = asyncio.run(refusal(answers["text"]))
    assert text.status == 400 and "no json here" in text.message and text.type is None


# ----- item 11: self-search defaults validated at start-up ------------------------------------


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"search_policy": "bogus"}, "'bogus' is not a policy"),
        ({"search_policy": "budget"}, "needs --search-budget"),
        ({"search_aggregate": "min_prob"}, "probability"),  # the default tau 3.0 is no probability
        ({"search_threshold": float("nan")}, "search_threshold"),
        ({"search_threshold": float("inf")}, "search_threshold"),
        ({"search_mode": "psychic"}, "search_mode"),
        ({"search_aggregate": "median"}, "search_aggregate"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_unusable_self_search_defaults_refuse_to_start(overrides: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as raised:
        ServeSettings(**overrides)
    assert says in str(raised.value)


def test_usable_self_search_defaults_start() -> None:
    ServeSettings(search_policy="budget", search_budget=1)
    ServeSettings(search_aggregate="min_prob", search_threshold=0.3)
    ServeSettings(search_policy="ssrl", search_aggregate="ssrl")


# ----- property: arbitrary unicode in every text field is never a 5xx ------------------------

CONFUSABLES = ["\u0430", "\u200b", "\u202e", "\ufeff", "\u2028", "\u00a0", "\uff4d", "\U0001d5c6", "\x00"]
_ANY = st.text(
    alphabet=st.one_of(
        st.characters(categories=["Cs"]),  # lone surrogates, as often as the rest
        st.characters(categories=["Cf", "Co", "Cc", "Zs", "Mn", "L", "N", "P", "S"]),
        st.sampled_from(CONFUSABLES),
    ),
    max_size=12,
)
# A low surrogate first is always lone (JSON would join a high one with a low one after it).
_LONE = st.tuples(st.characters(min_codepoint=0xDC00, max_codepoint=0xDFFF), _ANY).map("".join)
UNICODE = st.one_of(_ANY, _LONE)


def model_names() -> st.SearchStrategy[str]:
    # Mostly the served name, so that the other fields get past the 404.
    return st.one_of(
        st.just(MODEL), st.just(MODEL), st.just(MODEL), UNICODE, UNICODE.map(lambda s: MODEL + s)
    )


def stops() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), UNICODE, st.lists(UNICODE, min_size=1, max_size=3))


def contents() -> st.SearchStrategy[Any]:
    return st.one_of(UNICODE, st.lists(st.builds(lambda t: {"type": "text", "text": t}, UNICODE), max_size=2))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    common: dict[str, Any] = {"model": draw(model_names()), "max_tokens": 8, "stream": draw(st.booleans())}
    for key, strategy in (("stop", stops()), ("user", UNICODE)):
        if draw(st.booleans()):
            common[key] = draw(strategy)
    if draw(st.booleans()):
        prompt = draw(st.one_of(UNICODE, st.lists(UNICODE, min_size=1, max_size=2)))
        return COMPLETIONS, {**common, "prompt": prompt}
    messages = [
        {"role": draw(st.sampled_from(["system", "user"])), "content": draw(contents())},
        {
            "role": "user",
            "content": draw(contents()),
            **({"name": draw(UNICODE)} if draw(st.booleans()) else {}),
        },
    ]
    body = {**common, "messages": messages}
    if draw(st.booleans()):
        body["self_search"] = {
            "enabled": True,
            "policy": draw(st.one_of(st.sampled_from(["never", "always", "threshold"]), UNICODE)),
            "mode": draw(st.one_of(st.sampled_from(["native", "guided"]), UNICODE)),
            "aggregate": draw(st.one_of(st.sampled_from(["mean", "max"]), UNICODE)),
        }
        if draw(st.booleans()):
            body["self_search"][draw(UNICODE)] = draw(UNICODE)
    return CHAT, body


class LiveApp:
    """One app (lifespan entered once) on its own event loop, for many examples."""

    def __init__(self, engine: ScriptedEngine) -> None:
        self.loop = asyncio.new_event_loop()
        self.app = make_app(engine, max_tokens_limit=64)
        self.lifespan = self.app.router.lifespan_context(self.app)
        self.loop.run_until_complete(self.lifespan.__aenter__())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://t", timeout=30
        )

    def post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        return self.loop.run_until_complete(self.client.post(path, **raw(payload)))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self.lifespan.__aexit__(None, None, None))
        self.loop.close()


def guided_or_native(call: Call) -> Script:
    stop = call.options.stop
    if stop == NATIVE_STOPS:
        return script("<answer> Paris </answer>")
    if stop == ("</search>", "\n"):
        return script("capital</search>")
    if stop == ("</answer>", "\n", "</"):
        return script(" Paris </answer>")
    if stop == ("</information>",):
        return script("Paris.</information>")
    return script("Hello")


def test_arbitrary_unicode_in_every_text_field_is_never_a_5xx() -> None:
    live = LiveApp(StrictEngine(responder=guided_or_native, tokenizer=StrictTokenizer()))
    statuses: list[int] = []

    @settings(
        max_examples=50,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(requests())
    def check(request: tuple[str, dict[str, Any]]) -> None:
        path, payload = request
        response = live.post(path, payload)
        status, error = (response.status_code, None)
        if response.status_code == 200 and payload.get("stream"):
            events = sse_events(response)
            assert events[-1] == "[DONE]"
            errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
            assert all(e["type"] != "server_error" for e in errors), errors
        elif response.status_code != 200:
            status, error = error_of(response)
        assert 200 <= status < 500, (payload, response.text)
        if error is not None:
            error["message"].encode("utf-8")
        statuses.append(status)

    try:
        check()
    finally:
        live.close()
    assert 200 in statuses and 400 in statuses  # both sides were exercised
