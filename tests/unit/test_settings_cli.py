"""`ServeSettings` from flags and `SSRL_*` variables, and the `ssrl serve` parser built from it."""

from __future__ import annotations

import importlib.metadata
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
    args.pop("handler")  # the dispatcher's, not a setting
    return args


def settings_from(*argv: str) -> ServeSettings:
    return ServeSettings(**serve_flags(*argv))


def test_defaults() -> None:
    settings = settings_from()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.api_key == []
    assert settings.enforce_eager is None  # auto: eager on CPU, compiled on a GPU
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


# ----- the `ssrl` dispatcher (clients/cli.py) ------------------------------------------------


def test_the_overview_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("serve", "model", "index", "chat", "eval", "calibrate"):
        assert name in out


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_builtin_commands_live_with_their_side() -> None:
    from clients.cli import BUILTIN

    sides = {spec.name: spec.target.split(".")[0] for spec in BUILTIN}
    assert sides == {
        "serve": "server",
        "model": "server",
        "index": "server",
        "devset": "server",
        "chat": "clients",
        "eval": "clients",
        "calibrate": "clients",
    }
    assert all(spec.extra == "server" for spec in BUILTIN if spec.target.startswith("server."))


def _entry_points(*points: importlib.metadata.EntryPoint) -> Any:
    def fake(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return [p for p in points if p.group == group]

    return fake


def _register_hello(subparsers: Any) -> None:
    parser = subparsers.add_parser("hello", help="Say hello.")
    parser.add_argument("--name", default="world")
    parser.set_defaults(handler=lambda args: print(f"hello {args['name']}") or 0)


def test_a_command_from_an_entry_point(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import clients.cli

    point = importlib.metadata.EntryPoint(
        name="hello", value="tests.unit.test_settings_cli:_register_hello", group="ssrl.commands"
    )
    monkeypatch.setattr(clients.cli.importlib.metadata, "entry_points", _entry_points(point))
    assert "hello" in clients.cli.commands()
    assert main(["hello", "--name", "ssrl"]) == 0
    assert capsys.readouterr().out == "hello ssrl\n"
    # An entry point cannot take over a built-in name.
    taken = importlib.metadata.EntryPoint(
        name="serve", value="tests.unit.test_settings_cli:_register_hello", group="ssrl.commands"
    )
    monkeypatch.setattr(clients.cli.importlib.metadata, "entry_points", _entry_points(taken))
    assert clients.cli.commands()["serve"].target == "server.commands:register_serve"


def _register_without_fastapi(subparsers: Any) -> None:
    raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")


def test_a_missing_extra_is_named_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import clients.cli

    spec = clients.cli.CommandSpec(
        "serve", "tests.unit.test_settings_cli:_register_without_fastapi", "Start.", "server"
    )
    monkeypatch.setattr(clients.cli, "BUILTIN", (spec,))
    assert main(["serve", "--port", "9"]) == 2
    err = capsys.readouterr().err
    assert "'fastapi' is not installed" in err and "pip install 'ssrl[server]'" in err
    # The full parser (every command) stands a placeholder in for it, with the same message.
    args = vars(clients.cli.build_parser().parse_args(["serve", "--port", "9"]))
    assert args["handler"]({}) == 2
    assert "ssrl[server]" in capsys.readouterr().err


def test_a_missing_engine_names_the_engine_extras(capsys: pytest.CaptureFixture[str]) -> None:
    from clients.cli import BUILTIN, _missing_extra

    serve = next(spec for spec in BUILTIN if spec.name == "serve")
    problem = _missing_extra(serve, ModuleNotFoundError("No module named 'vllm'", name="vllm"))
    assert problem is not None and "ssrl[cpu]" in str(problem) and "ssrl[gpu]" in str(problem)
    # A missing module of ssrl itself is a bug: it is not dressed up as a missing extra.
    assert _missing_extra(serve, ModuleNotFoundError("x", name="server.nope")) is None


def test_the_loop_defaults_are_declared_once() -> None:
    import dataclasses

    from router.loop import LoopConfig

    loop = {f.name: f.default for f in dataclasses.fields(LoopConfig)}
    settings = ServeSettings()
    pairs = {
        "max_turns": "max_turns",
        "docs_per_search": "docs_per_search",
        "max_external_calls": "max_external_calls",
        "entropy_top_k": "logprobs_k",
        "max_doc_chars": "max_doc_chars",
        "max_query_tokens": "max_query_tokens",
        "max_information_tokens": "max_information_tokens",
        "max_answer_tokens": "max_answer_tokens",
        "guided_searches": "guided_searches",
        "max_loop_tokens": "max_tokens",
    }
    assert {s: getattr(settings, s) for s in pairs} == {s: loop[f] for s, f in pairs.items()}


def test_enforce_eager_unset_means_eager_on_cpu_compiled_on_gpu() -> None:
    from server.app import resolve_enforce_eager

    assert settings_from().enforce_eager is None
    assert settings_from("--enforce-eager").enforce_eager is True
    assert settings_from("--no-enforce-eager").enforce_eager is False
    assert resolve_enforce_eager(None, on_cpu=lambda: True)[0] is True
    assert resolve_enforce_eager(None, on_cpu=lambda: False)[0] is False
    # A flag wins on either backend, and the log line names it.
    assert resolve_enforce_eager(True, on_cpu=lambda: False) == (True, "--enforce-eager")
    assert resolve_enforce_eager(False, on_cpu=lambda: True) == (False, "--no-enforce-eager")


def test_cpu_engine_uses_small_kv_blocks_unless_an_engine_arg_sets_them() -> None:
    from router.engine.vllm_engine import CPU_BLOCK_SIZE, EngineConfig

    config = EngineConfig(model="m", served_model_name="m")
    # A GPU keeps vLLM's own default; the CPU backend gets ssrl's (the loop's resumed calls
    # re-prefill only a partial block), and an operator's --engine-arg block_size wins on both.
    assert "block_size" not in config.engine_args(on_cpu=False)
    assert config.engine_args(on_cpu=True)["block_size"] == CPU_BLOCK_SIZE == 32
    pinned = EngineConfig(
        model="m",
        served_model_name="m",
        extra=settings_from("--engine-arg", "block_size=128").extra_engine_args(),
    )
    assert pinned.engine_args(on_cpu=True)["block_size"] == 128


def test_cpu_engine_shares_the_reserved_core_only_on_a_two_core_machine() -> None:
    from router.engine.vllm_engine import RESERVED_CPU_ENV, cpu_engine_env

    # vLLM keeps one core for its scheduler: on 2 cores the model would get one.
    assert cpu_engine_env({}, cores=2) == {RESERVED_CPU_ENV: "0"}
    assert cpu_engine_env({}, cores=1) == {RESERVED_CPU_ENV: "0"}
    # Larger machines keep vLLM's reservation.
    assert cpu_engine_env({}, cores=3) == {}
    # An operator's own choice wins: a reservation, or an explicit thread binding.
    assert cpu_engine_env({RESERVED_CPU_ENV: "1"}, cores=2) == {}
    assert cpu_engine_env({"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, cores=2) == {}
    assert cpu_engine_env({"VLLM_CPU_OMP_THREADS_BIND": "auto"}, cores=2) == {RESERVED_CPU_ENV: "0"}


def test_the_engine_writes_compact_json_unless_told_otherwise() -> None:
    pytest.importorskip("vllm")
    from router.engine.vllm_engine import EngineConfig

    config = EngineConfig(model="m", served_model_name="m")
    structured = config.engine_args()["structured_outputs_config"]
    assert (structured.backend, structured.disable_any_whitespace) == ("xgrammar", True)
    own = EngineConfig(model="m", served_model_name="m", extra={"structured_outputs_config": "mine"})
    assert own.engine_args()["structured_outputs_config"] == "mine"
