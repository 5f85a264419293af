"""`ServeSettings` from flags and `SSRL_*` variables, and the `ssrl serve` parser built from it."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import ValidationError

from clients.cli import build_parser, main
from router.engine.default_model import DEFAULT_MODEL_NAME
from server.settings import ServeSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `SSRL_*` variable of the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("SSRL_"):
            monkeypatch.delenv(name)


def serve_flags(*argv: str) -> dict[str, Any]:
    args = vars(build_parser().parse_args(["serve", *argv]))
    assert args.pop("command") == "serve"
    return args


def settings_from(*argv: str) -> ServeSettings:
    return ServeSettings(**serve_flags(*argv))


def test_defaults() -> None:
    settings = settings_from()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.api_key == []
    assert settings.enforce_eager is False
    assert settings.enable_prefix_caching is True
    assert settings.max_model_len is None
    assert settings.engine_arg == []
    assert settings.extra_engine_args() == {}


def test_unset_flags_stay_out_of_the_parsed_args() -> None:
    # Only flags given on the command line reach the settings, so the environment can apply.
    assert serve_flags() == {}
    assert serve_flags("--port", "9") == {"port": 9}


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSRL_PORT", "1234")
    monkeypatch.setenv("SSRL_API_KEY", "a,b")
    monkeypatch.setenv("SSRL_ENFORCE_EAGER", "true")
    monkeypatch.setenv("SSRL_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("SSRL_ENGINE_ARG", "block_size=16, swap_space=2")
    settings = ServeSettings()
    assert settings.port == 1234
    assert settings.api_key == ["a", "b"]
    assert settings.enforce_eager is True
    assert settings.max_model_len == 512
    assert settings.extra_engine_args() == {"block_size": 16, "swap_space": 2}


def test_single_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSRL_API_KEY", "only-one")
    assert ServeSettings().api_key == ["only-one"]


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSRL_PORT", "1234")
    monkeypatch.setenv("SSRL_HOST", "0.0.0.0")
    monkeypatch.setenv("SSRL_API_KEY", "env-key")
    monkeypatch.setenv("SSRL_ENFORCE_EAGER", "true")
    settings = settings_from("--port", "9", "--api-key", "flag-key", "--no-enforce-eager")
    assert settings.port == 9
    assert settings.api_key == ["flag-key"]
    assert settings.enforce_eager is False
    # What no flag sets still comes from the environment.
    assert settings.host == "0.0.0.0"


def test_typed_flags() -> None:
    settings = settings_from(
        "--port",
        "9",
        "--max-model-len",
        "2048",
        "--gpu-memory-utilization",
        "0.5",
        "--max-request-bytes",
        "1000",
        "--enforce-eager",
        "--host",
        "0.0.0.0",
    )
    assert settings.port == 9
    assert settings.max_model_len == 2048
    assert settings.gpu_memory_utilization == 0.5
    assert settings.max_request_bytes == 1000
    assert settings.enforce_eager is True
    assert settings.host == "0.0.0.0"


def test_non_numeric_int_flag_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--port", "many"])
    assert exc.value.code == 2


def test_no_enable_prefix_caching() -> None:
    assert settings_from("--no-enable-prefix-caching").enable_prefix_caching is False
    assert settings_from("--enable-prefix-caching").enable_prefix_caching is True


def test_repeated_api_key() -> None:
    assert settings_from("--api-key", "a", "--api-key", "b").api_key == ["a", "b"]


def test_engine_arg_values_parse_as_json() -> None:
    settings = settings_from(
        "--engine-arg",
        "key=3",
        "--engine-arg",
        "max-num-batched-tokens=512",
        "--engine-arg",
        "kv_cache_dtype=fp8",
        "--engine-arg",
        "disable_log_stats=true",
        "--engine-arg",
        'limit_mm_per_prompt={"image": 0}',
        "--engine-arg",
        "empty=",
    )
    assert settings.extra_engine_args() == {
        "key": 3,
        "max_num_batched_tokens": 512,
        "kv_cache_dtype": "fp8",
        "disable_log_stats": True,
        "limit_mm_per_prompt": {"image": 0},
        "empty": "",
    }


def test_single_engine_arg() -> None:
    assert settings_from("--engine-arg", "key=3").extra_engine_args() == {"key": 3}


@pytest.mark.parametrize("bad", ["novalue", "=3", " =3"])
def test_bad_engine_arg_is_a_value_error(bad: str) -> None:
    settings = settings_from("--engine-arg", bad)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        settings.extra_engine_args()


def test_serve_rejects_bad_settings_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    # Both are refused with exit code 2 before uvicorn or vLLM start.
    assert main(["serve", "--engine-arg", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_out_of_range_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        ServeSettings(port=-1)
    with pytest.raises(ValidationError):
        ServeSettings(max_request_bytes=0)
    monkeypatch.setenv("SSRL_GPU_MEMORY_UTILIZATION", "1.5")
    with pytest.raises(ValidationError):
        ServeSettings()


def test_model_name_defaults() -> None:
    assert ServeSettings().model_name == DEFAULT_MODEL_NAME
    assert ServeSettings().uses_default_model
    local = ServeSettings(model="/models/my-model/")
    assert local.model_name == "/models/my-model"
    assert not local.uses_default_model
    assert ServeSettings(model="org/name").model_name == "org/name"
    assert ServeSettings(model="org/name", served_model_name="short").model_name == "short"
    assert ServeSettings(served_model_name="alias").model_name == "alias"


def test_served_model_name_from_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSRL_SERVED_MODEL_NAME", "from-env")
    assert ServeSettings().model_name == "from-env"
    assert settings_from("--served-model-name", "from-flag").model_name == "from-flag"


def test_cache_dir_follows_ssrl_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SSRL_CACHE_DIR", str(tmp_path))
    assert ServeSettings().cache_dir == tmp_path


def test_every_settings_field_has_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    for name in ServeSettings.model_fields:
        assert "--" + name.replace("_", "-") in help_text, name


def test_entropy_top_k_cannot_exceed_max_logprobs():
    import pydantic
    import pytest

    from server.settings import ServeSettings

    with pytest.raises(pydantic.ValidationError, match="entropy-top-k"):
        ServeSettings(entropy_top_k=30, max_logprobs=20)
    assert ServeSettings(entropy_top_k=5, max_logprobs=5).entropy_top_k == 5
