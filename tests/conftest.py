"""Shared fixtures: one real `ssrl serve` (vLLM on the embedded default model) per session.

Any test that uses the `server` fixture, directly or through `openai_client`, `http`,
`model_name`..., is marked `engine` at collection, so `pytest -m "not engine"` runs the
fast unit tests alone and never starts vLLM.

To add server flags for new e2e tests (say, a search index), extend `SERVER_ARGS`.
Set `SSRL_TEST_BASE_URL` (and `SSRL_TEST_API_KEY`) to run the engine tests against a
server you started yourself instead of a fresh one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

API_KEY = "sk-ssrl-test-key"
MAX_MODEL_LEN = 2048
MAX_REQUEST_BYTES = 1_000_000
STARTUP_TIMEOUT_S = 420.0
SHUTDOWN_GRACE_S = 30.0

# `ssrl serve` flags for the session server (the port is appended per run). Extend this list
# when a test needs another flag; every e2e test shares the one server it starts.
SERVER_ARGS: list[str] = [
    "--host",
    "127.0.0.1",
    "--enforce-eager",
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--api-key",
    API_KEY,
    "--max-request-bytes",
    str(MAX_REQUEST_BYTES),
]


def server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "clients.cli", "serve", "--port", str(port), *SERVER_ARGS]


@dataclass
class RunningServer:
    base_url: str
    api_key: str
    log_path: Path | None
    process: subprocess.Popen | None

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, lines: int = 80) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            pytest.fail(
                f"ssrl serve exited with code {server.process.returncode} before it was healthy.\n"
                f"--- log tail ({server.log_path}) ---\n{server.log_tail()}",
                pytrace=False,
            )
        try:
            response = httpx.get(server.base_url + "/health", timeout=5)
            if response.status_code == 200:
                return
            last_error = f"/health answered {response.status_code}"
        except httpx.HTTPError as exc:
            last_error = repr(exc)
        time.sleep(1.0)
    pytest.fail(
        f"ssrl serve was not healthy after {timeout:.0f}s ({last_error}).\n"
        f"--- log tail ({server.log_path}) ---\n{server.log_tail()}",
        pytrace=False,
    )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, a grace period, then SIGKILL for the whole group (vLLM's engine-core child too)."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        # The server leads its own session (start_new_session), so its pgid is its pid; any
        # child left behind (the engine core) still belongs to that group.
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    external = os.environ.get("SSRL_TEST_BASE_URL")
    if external:
        running = RunningServer(
            base_url=external.rstrip("/"),
            api_key=os.environ.get("SSRL_TEST_API_KEY", API_KEY),
            log_path=None,
            process=None,
        )
        _wait_healthy(running, 30)
        yield running
        return

    port = _free_port()
    log_path = tmp_path_factory.mktemp("ssrl-server") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server_command(port),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    running = RunningServer(
        base_url=f"http://127.0.0.1:{port}", api_key=API_KEY, log_path=log_path, process=process
    )
    try:
        _wait_healthy(running, STARTUP_TIMEOUT_S)
        yield running
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    """A plain HTTP client on the server, without the API key (tests add it when they want)."""
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def auth_headers(server: RunningServer) -> dict[str, str]:
    return server.auth_headers


@pytest.fixture(scope="session")
def openai_client(server: RunningServer):
    import openai

    client = openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=120
    )
    yield client
    client.close()


@pytest.fixture
def async_openai_client(server: RunningServer):
    """An AsyncOpenAI client; function-scoped because its connections belong to one event loop."""
    import openai

    return openai.AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=120
    )


@pytest.fixture(scope="session")
def model_name(http: httpx.Client, server: RunningServer) -> str:
    response = http.get("/v1/models", headers=server.auth_headers)
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["id"]


# ----- a second engine: vLLM's own OpenAI server, for remote-engine routers ----------------


def _start(argv: list[str], log_path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Iterator[RunningServer]:
    """vLLM's own OpenAI server on the default checkpoint."""
    from router.engine.default_model import ensure_default_checkpoint

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    port = _free_port()
    vllm = _start(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(ensure_default_checkpoint()),
            "--served-model-name",
            "upstream",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--max-model-len",
            "2048",
            "--enforce-eager",
        ],
        log,
        ENV,
    )
    running = RunningServer(f"http://127.0.0.1:{port}", "", log, vllm)
    try:
        _wait_healthy(running, 420)
        yield running
    finally:
        _stop(vllm)


def start_router(
    upstream: RunningServer, api_key: str, log, *extra: str, env: dict[str, str] | None = None
) -> RunningServer:
    """An ssrl router (no engine of its own, so it starts in seconds) in front of `upstream`."""
    port = _free_port()
    process = _start(
        [
            sys.executable,
            "-m",
            "clients.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--engine-url",
            upstream.base_url + "/v1",
            "--api-key",
            api_key,
            *extra,
        ],
        log,
        {**ENV, **(env or {})},
    )
    running = RunningServer(f"http://127.0.0.1:{port}", api_key, log, process)
    _wait_healthy(running, 120)
    return running


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `fixturenames` is the closure of every fixture a test needs, so indirect use counts too.
    for item in items:
        if {"server", "upstream"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)
