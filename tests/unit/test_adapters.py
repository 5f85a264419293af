"""LoRA adapters served beside the base model (router/engine/adapters.py and the server's use).

vLLM's flag formats, the settings' refusals, and, on a scripted engine: an adapter's requests
run on that adapter in native mode with its own system prompt, the response names it, and
/v1/models lists it with the base as its parent, as vLLM does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from router.engine.adapters import (
    EMBEDDED_ADAPTER_NAME,
    EMBEDDED_ADAPTER_TAU,
    Adapter,
    adapter_rank,
    embedded_adapter,
    numbered,
    parse_lora_modules,
)
from router.engine.vllm_engine import EngineConfig, lora_engine_args
from router.prompts import NATIVE_COMPACT
from server.settings import ServeSettings
from tests.scripted_engine import ScriptedEngine
from tests.unit.test_self_search_http import MODEL, USER, FakeBackend, Responder, run_app


def _adapter_dir(tmp_path: Path, rank: int = 16) -> Path:
    path = tmp_path / f"lora-r{rank}"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return path


def test_parse_lora_modules_reads_both_of_vllms_formats() -> None:
    adapters = parse_lora_modules(["a=/x/a", '{"name": "b", "path": "/x/b", "base_model_name": "m"}'])
    assert [(a.name, a.path) for a in adapters] == [("a", "/x/a"), ("b", "/x/b")]


@pytest.mark.parametrize("item", ["noequals", "=/x", "a=", "{bad json", '{"name": "a"}', '["a", "b"]'])
def test_parse_lora_modules_names_the_bad_item(item: str) -> None:
    with pytest.raises(ValueError, match="--lora-modules"):
        parse_lora_modules([item])


def test_numbered_gives_vllms_ids_in_listing_order_and_refuses_a_repeated_name() -> None:
    adapters = numbered([Adapter("a", "/a"), Adapter("b", "/b")])
    assert [a.lora_int_id for a in adapters] == [1, 2]
    with pytest.raises(ValueError, match="twice"):
        numbered([Adapter("a", "/a"), Adapter("a", "/b")])


def test_engine_args_enable_lora_with_the_smallest_rank_that_holds_every_adapter(tmp_path: Path) -> None:
    small, big = _adapter_dir(tmp_path, 8), _adapter_dir(tmp_path, 20)
    assert adapter_rank(str(big)) == 20
    args = lora_engine_args([Adapter("s", str(small)), Adapter("b", str(big))])
    assert args == {"enable_lora": True, "max_lora_rank": 32, "max_loras": 2, "max_cpu_loras": 2}
    config = EngineConfig(
        model="m", served_model_name="m", adapters=(Adapter("s", str(small), lora_int_id=1),)
    )
    assert config.engine_args()["max_lora_rank"] == 8
    assert "enable_lora" not in EngineConfig(model="m", served_model_name="m").engine_args()


def test_the_embedded_adapter_is_shipped_and_served_with_the_embedded_model() -> None:
    shipped = embedded_adapter()
    assert shipped is not None, "router/engine/weights/smollm2-135m-ssrl is missing"
    assert adapter_rank(shipped.path) == 16
    assert shipped.system_prompt == NATIVE_COMPACT
    settings = ServeSettings(warmup=False)
    assert [a.name for a in settings.adapters()] == [EMBEDDED_ADAPTER_NAME]
    assert ServeSettings(native_adapter=False).adapters() == []
    # A model of the user's own: the embedded adapter is not its LoRA.
    assert ServeSettings(model="/some/model").adapters() == []


def test_settings_refuse_adapters_the_server_cannot_serve(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--engine-url"):
        ServeSettings(engine_url="http://127.0.0.1:9/v1", lora_modules=[f"a={tmp_path}"])
    with pytest.raises(ValidationError, match="base model's own name"):
        ServeSettings(native_adapter=False, lora_modules=[f"{MODEL}={tmp_path}"])
    with pytest.raises(ValidationError, match="--lora-modules"):
        ServeSettings(lora_modules=["nothing"])


def test_lora_modules_from_the_environment_split_on_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSRL_LORA_MODULES", "a=/x/a b=/x/b")
    assert ServeSettings(native_adapter=False).lora_modules == ["a=/x/a", "b=/x/b"]


def _serve(engine: ScriptedEngine, tmp_path: Path, body: Any) -> Any:
    return run_app(
        engine,
        body,
        search_mode="guided",
        native_adapter=False,
        lora_modules=[f"mine={_adapter_dir(tmp_path)}"],
    )


def test_an_adapter_request_runs_on_the_adapter_in_native_mode(tmp_path: Path) -> None:
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/chat/completions", json={"model": "mine", "messages": USER})

    response = _serve(engine, tmp_path, body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "mine"
    assert data["choices"][0]["message"]["content"] == "Paris"
    assert engine.calls and all(c.options.adapter == "mine" for c in engine.calls)
    # Native: the model wrote the search itself (the native stops), no worked examples.
    assert engine.calls[0].options.stop == ("</answer>",)
    assert "Oliver Twist" not in engine.calls[0].prompt_text


def test_the_base_model_keeps_its_mode_and_runs_without_an_adapter(tmp_path: Path) -> None:
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})

    response = _serve(engine, tmp_path, body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == MODEL
    assert all(c.options.adapter is None for c in engine.calls)
    assert "Oliver Twist" in engine.calls[0].prompt_text  # guided mode's worked examples


def test_plain_generation_on_an_adapter_names_it(tmp_path: Path) -> None:
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            "/v1/chat/completions",
            json={"model": "mine", "messages": USER, "self_search": {"enabled": False}, "max_tokens": 4},
        )

    response = _serve(engine, tmp_path, body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "mine"
    assert [c.options.adapter for c in engine.calls] == ["mine"]


def test_models_lists_each_adapter_with_the_base_as_parent_and_unknown_names_404(tmp_path: Path) -> None:
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        listed = await client.get("/v1/models")
        one = await client.get("/v1/models/mine")
        unknown = await client.post("/v1/chat/completions", json={"model": "nope", "messages": USER})
        return listed, one, unknown

    listed, one, unknown = _serve(engine, tmp_path, body)
    cards = {c["id"]: c for c in listed.json()["data"]}
    assert set(cards) == {MODEL, "mine"}
    assert cards["mine"]["parent"] == MODEL and cards["mine"]["root"].endswith("lora-r16")
    assert cards[MODEL]["parent"] is None
    assert one.status_code == 200 and one.json()["parent"] == MODEL
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "model_not_found" and "`mine`" in error["message"]


def _searched_query(
    engine: ScriptedEngine, monkeypatch: pytest.MonkeyPatch, model: str, tmp_path: Path
) -> str:
    backend = FakeBackend()

    async def body(client: httpx.AsyncClient) -> httpx.Response:
        payload = {"model": model, "messages": USER, "self_search": {"policy": "always"}}
        return await client.post("/v1/chat/completions", json=payload)

    response = run_app(
        engine,
        body,
        backend=backend,
        monkeypatch=monkeypatch,
        search_mode="guided",
        lora_modules=[f"mine={_adapter_dir(tmp_path)}"],
    )
    assert response.status_code == 200, response.text
    (query,) = backend.queries
    return query


def test_the_embedded_adapter_searches_with_the_question_as_it_was_trained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    question = USER[0]["content"]
    embedded = _searched_query(
        ScriptedEngine(responder=Responder()), monkeypatch, EMBEDDED_ADAPTER_NAME, tmp_path
    )
    assert embedded == f"capital of France {question}"
    # A user's adapter is an SSRL model: its query goes out as it wrote it.
    (tmp_path / "x").mkdir()
    own = _searched_query(ScriptedEngine(responder=Responder()), monkeypatch, "mine", tmp_path / "x")
    assert own == "capital of France"


def test_the_embedded_adapter_routes_at_its_own_threshold_unless_the_operator_sets_one() -> None:
    from server.protocol import ChatCompletionRequest
    from server.serving_self_search import SelfSearchRuntime, loop_config

    shipped = embedded_adapter()
    assert shipped is not None and shipped.search_threshold is not None
    request = ChatCompletionRequest.model_validate({"model": EMBEDDED_ADAPTER_NAME, "messages": USER})

    def tau(settings: ServeSettings, adapter: Adapter | None) -> float | None:
        runtime = SelfSearchRuntime(settings=settings, search=None, system_prompts={}, mode="guided")  # type: ignore[arg-type]
        config, _ = loop_config(runtime, request, 64, adapter)
        return getattr(config.policy, "tau", None)

    assert tau(ServeSettings(), shipped) == shipped.search_threshold
    assert tau(ServeSettings(), None) == ServeSettings().search_threshold
    assert tau(ServeSettings(search_threshold=2.5), shipped) == 2.5


def test_the_merged_native_model_is_served_as_its_own_model_with_the_adapters_profile() -> None:
    settings = ServeSettings(model=EMBEDDED_ADAPTER_NAME, warmup=False)
    assert settings.serves_embedded_native and settings.embedded_weights
    assert settings.resolved_search_mode == "native"
    # Merged weights: no LoRA of it beside it, and its profile is the base model's own.
    assert settings.adapters() == []
    profile = settings.base_profile()
    assert profile is not None and profile.merged and profile.lora_name is None
    assert profile.search_threshold == EMBEDDED_ADAPTER_TAU
    assert ServeSettings(model="/some/model").base_profile() is None
    engine = ScriptedEngine(responder=Responder())

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        chat = await client.post(
            "/v1/chat/completions", json={"model": EMBEDDED_ADAPTER_NAME, "messages": USER}
        )
        return chat, await client.get("/v1/models")

    chat, models = run_app(engine, body, model=EMBEDDED_ADAPTER_NAME, search_mode="auto")
    assert chat.status_code == 200, chat.text
    assert [c["id"] for c in models.json()["data"]] == [EMBEDDED_ADAPTER_NAME]
    # Native mode with the prompt the adapter was trained with, on the base (no LoRA request).
    assert engine.calls and all(c.options.adapter is None for c in engine.calls)
    assert engine.calls[0].options.stop == ("</answer>",)
    assert NATIVE_COMPACT in engine.calls[0].prompt_text
    assert "Oliver Twist" not in engine.calls[0].prompt_text
