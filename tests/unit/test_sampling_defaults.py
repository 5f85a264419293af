"""The sampling a request that omits temperature / top_p gets (issue 30): the served model's
defaults, one rule on every path, an explicit value always winning."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from router.engine.default_model import EMBEDDED_SAMPLING_DEFAULTS
from server.sampling import SamplingDefaults, resolve_sampling_defaults, sampling_defaults_for
from server.settings import ServeSettings
from server.vllm_serving import apply_sampling_defaults, with_default_sampling
from tests.scripted_engine import ScriptedEngine, script
from tests.unit.test_http_layer import CHAT, COMPLETIONS, MODEL, chat, drive, post


def engine() -> ScriptedEngine:
    return ScriptedEngine(responder=lambda call: script("Paris"))


@pytest.mark.parametrize(
    ("flags", "model", "embedded", "expected"),
    [
        ({}, {}, None, SamplingDefaults(1.0, 1.0, "openai")),
        ({}, {}, {"temperature": 0.0}, SamplingDefaults(0.0, 1.0, "embedded")),
        ({}, {"temperature": 0.6, "top_p": 0.9}, {"temperature": 0.0}, SamplingDefaults(0.6, 0.9, "model")),
        ({"temperature": 0.2, "top_p": None}, {"top_p": 0.9}, None, SamplingDefaults(0.2, 0.9, "flag")),
        ({"temperature": None}, {"temperature": True}, None, SamplingDefaults(1.0, 1.0, "openai")),
    ],
)
def test_each_default_comes_from_the_first_layer_that_sets_it(
    flags: dict[str, Any],
    model: dict[str, Any],
    embedded: dict[str, float] | None,
    expected: SamplingDefaults,
) -> None:
    assert resolve_sampling_defaults(flags, model, embedded) == expected


def test_the_embedded_model_gets_its_measured_defaults_and_any_other_its_own() -> None:
    config = SimpleNamespace(get_diff_sampling_param=dict)
    embedded = sampling_defaults_for(ServeSettings(), config)
    assert embedded.temperature == EMBEDDED_SAMPLING_DEFAULTS["temperature"] and embedded.source == "embedded"
    own = sampling_defaults_for(ServeSettings(model="/some/model"), config)
    assert own == SamplingDefaults()
    flagged = sampling_defaults_for(ServeSettings(default_temperature=0.3), None)
    assert (flagged.temperature, flagged.source) == (0.3, "flag")


def test_an_explicit_value_always_wins() -> None:
    defaults = SamplingDefaults(0.0, 0.5, "embedded")
    assert (defaults.temperature_for(None), defaults.temperature_for(0.9)) == (0.0, 0.9)
    assert (defaults.top_p_for(None), defaults.top_p_for(1.0)) == (0.5, 1.0)


def test_vllm_s_layer_gets_the_same_defaults() -> None:
    config = SimpleNamespace(override_generation_config={"max_new_tokens": 32})
    apply_sampling_defaults(config, SamplingDefaults(0.0, 1.0, "embedded"))
    assert config.override_generation_config == {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0}


def test_a_remote_server_gets_them_in_the_body() -> None:
    defaults = SamplingDefaults(0.0, 1.0, "embedded")
    assert with_default_sampling(CHAT, {"model": "m"}, defaults) == {
        "model": "m",
        "temperature": 0.0,
        "top_p": 1.0,
    }
    sent = {"model": "m", "temperature": 0.7, "top_p": 0.5}
    assert with_default_sampling(CHAT, sent, defaults) is sent
    assert with_default_sampling(CHAT, {"model": "m"}, SamplingDefaults()) == {"model": "m"}
    assert with_default_sampling("/tokenize", {"model": "m"}, defaults) == {"model": "m"}


@pytest.mark.parametrize("self_search", [False, True])
def test_ssrl_s_own_serving_samples_at_the_defaults(self_search: bool) -> None:
    scripted = engine()
    response = post(
        scripted, CHAT, chat(max_tokens=8), self_search=self_search, search="none", default_temperature=0.25
    )
    assert response.status_code == 200, response.text
    assert {c.options.temperature for c in scripted.calls} == {0.25}
    explicit = engine()
    post(explicit, CHAT, chat(max_tokens=8, temperature=0.9), self_search=self_search, search="none")
    assert {c.options.temperature for c in explicit.calls} == {0.9}
    if self_search:
        trace = response.json()["choices"][0]["self_search"]
        assert trace["sampling"] == {"temperature": 0.25, "top_p": 1.0, "defaults": "flag"}


def test_completions_sample_at_the_defaults_too() -> None:
    scripted = engine()
    post(scripted, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}, default_temperature=0.25)
    assert [c.options.temperature for c in scripted.calls] == [0.25]


def test_the_model_card_says_the_defaults() -> None:
    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.get("/v1/models"), await client.get(f"/v1/models/{MODEL}")]

    listing, card = drive(engine(), body)
    for model in (listing.json()["data"][0], card.json()):
        assert model["sampling_defaults"] == {
            "temperature": EMBEDDED_SAMPLING_DEFAULTS["temperature"],
            "top_p": 1.0,
            "source": "embedded",
        }
