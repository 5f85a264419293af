"""The profile benchmark's pure pieces (bench/profile_serving.py): parsing py-spy's collapsed
stacks and charging each sample to the innermost owned frame. No server, no py-spy."""

from __future__ import annotations

from pathlib import Path

from bench.common import ROOT
from bench.profile_serving import UNOWNED, attribute, owner_of, parse_frame, read_collapsed, role_of

SITE = "/x/.venv/lib/python3.11/site-packages"
PROC = 'process 41:"python -m clients.cli serve"'
CORE = 'process 42:"VLLM::EngineCore"'


def frame(name: str, path: str, line: int = 1) -> str:
    return f"{name} ({path}:{line})"


def test_parse_frame_splits_name_and_path() -> None:
    assert parse_frame("run (/a/b (c)/d.py:12)") == ("run", "/a/b (c)/d.py")
    assert parse_frame("<module>") == ("<module>", "")


def test_owner_of_puts_ssrl_before_vllm_and_skips_the_standard_library() -> None:
    assert owner_of(f"{ROOT}/server/limits.py") == "ssrl"
    assert owner_of(f"{SITE}/vllm/entrypoints/openai/chat_completion/serving.py") == "vllm serving layer"
    assert owner_of(f"{SITE}/vllm/v1/engine/output_processor.py") == "vllm engine client"
    assert owner_of(f"{SITE}/vllm/v1/core/sched/scheduler.py") == "vllm (engine, other)"
    assert owner_of(f"{SITE}/starlette/routing.py") == "http stack"
    assert owner_of("/usr/lib/python3.11/asyncio/runners.py") == "event loop"
    assert owner_of("/usr/lib/python3.11/json/encoder.py") is None


def test_a_sample_goes_to_the_innermost_owned_frame() -> None:
    http = frame("run_asgi", f"{SITE}/uvicorn/protocols/http/httptools_impl.py")
    ssrl = frame("__call__", f"{ROOT}/server/limits.py")
    vllm = frame("create_chat_completion", f"{SITE}/vllm/entrypoints/openai/chat_completion/serving.py")
    json_dumps = frame("dumps", "/usr/lib/python3.11/json/__init__.py")
    stacks = [
        ([PROC, http, ssrl, vllm, json_dumps], 7),  # vLLM's code under ssrl's middleware: vLLM's
        ([PROC, http, ssrl, json_dumps], 3),  # ssrl's own work (the stdlib leaf is its callee)
        ([PROC, frame("select", "/usr/lib/python3.11/selectors.py")], 2),  # nobody's
    ]
    per = attribute(stacks)
    entry = per["api"]
    assert entry["samples"] == 12
    assert entry["owners"] == {"vllm serving layer": 7, "ssrl": 3, UNOWNED: 2}
    assert entry["ssrl_functions"] == {"__call__ (server/limits.py)": 3}


def test_read_collapsed_takes_the_count_after_the_last_space(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text('process 1:"a b";f (x.py:1);g (y z.py:2) 5\nnot a line\n', encoding="utf-8")
    assert read_collapsed(path) == [(['process 1:"a b"', "f (x.py:1)", "g (y z.py:2)"], 5)]


def test_samples_of_a_child_process_go_to_its_role() -> None:
    forward = frame("forward", f"{SITE}/vllm/model_executor/models/llama.py")
    per = attribute([([PROC, CORE, forward], 4), ([PROC, frame("f", f"{ROOT}/server/app.py")], 1)])
    assert per["engine core"]["owners"] == {"vllm (engine, other)": 4}
    assert per["api"]["owners"] == {"ssrl": 1}


def test_role_of_names_the_server_process_and_vllms_children() -> None:
    assert role_of([PROC]) == "api"
    assert role_of([PROC, CORE]) == "engine core"
    assert role_of([PROC, CORE, 'process 43:"VLLM::Worker"']) == "engine worker"
    assert role_of([PROC, 'process 44:"/x/bin/python -c ..."']) == "other (python)"
