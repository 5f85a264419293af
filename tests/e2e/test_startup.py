"""SIGTERM during start-up: `ssrl serve` and every process it started are gone within 5 s.

Start-up is the slow part of a server's life (importing torch and vLLM, starting the engine
core, compiling, warming up); an orchestrator that stops a pod then, or a user pressing
Ctrl-C on `make serve`, must not wait for it. Each case starts its OWN short-lived server
(not the session one), sends SIGTERM at one point of start-up, and checks that the server,
every descendant it had, and anything left in its process group have exited within the
bound. The bound is the requirement; nothing else here is timed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT, _free_port

pytestmark = pytest.mark.engine

EXIT_BOUND_S = 5.0
# Waiting for a point of start-up: generous, the machine may be shared and loaded.
REACH_TIMEOUT_S = 300.0
ENGINE_LOG_LINE = "starting the vLLM engine"


class Tracked:
    """A server process and every descendant seen while it started (they may be orphaned)."""

    def __init__(self, process: subprocess.Popen, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.seen: dict[int, psutil.Process] = {}

    def scan(self) -> None:
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + REACH_TIMEOUT_S
        while time.monotonic() < deadline:
            self.scan()
            if condition():
                return
            if self.process.poll() is not None:
                pytest.fail(f"server exited ({self.process.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.05)
        pytest.fail(f"{what}: not reached within {REACH_TIMEOUT_S:.0f}s:\n{self.tail()}")

    def engine_core_running(self) -> bool:
        for proc in list(self.seen.values()):
            try:
                if "EngineCore" in proc.name() and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                continue
        return False

    def alive(self) -> list[str]:
        """What is still running: the server, a descendant seen earlier, or a member of its group."""
        left = []
        if self.process.poll() is None:
            left.append(f"server {self.process.pid}")
        candidates = dict(self.seen)
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.process.pid:
                    candidates.setdefault(proc.pid, proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        for pid, proc in candidates.items():
            if pid == self.process.pid:
                continue
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(
                        f"{pid} {proc.name()} ppid {proc.ppid()} {proc.status()} {' '.join(proc.cmdline())[:120]}"
                    )
            except psutil.Error:
                continue
        return left

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[], Tracked]]:
    started: list[Tracked] = []

    def start() -> Tracked:
        log_path = tmp_path / "serve.log"
        argv = [
            sys.executable,
            "-m",
            "clients.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(_free_port()),
            "--enforce-eager",
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        tracked = Tracked(process, log_path)
        started.append(tracked)
        return tracked

    yield start
    for tracked in started:  # whatever the outcome, leave nothing behind
        for proc in [*tracked.seen.values()]:
            try:
                proc.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(tracked.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            tracked.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def assert_gone_after_sigterm(server: Tracked) -> None:
    server.scan()
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    deadline = sent + EXIT_BOUND_S
    left = server.alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = server.alive()
    assert not left, (
        f"still running {EXIT_BOUND_S:.0f}s after SIGTERM: {left}\n--- log tail ---\n{server.tail()}"
    )
    print(f"gone {time.monotonic() - sent:.2f}s after SIGTERM (rc {server.process.returncode})")


def test_sigterm_right_after_the_process_starts(start_server: Callable[[], Tracked]) -> None:
    server = start_server()
    assert_gone_after_sigterm(server)


def test_sigterm_while_the_app_starts(start_server: Callable[[], Tracked]) -> None:
    server = start_server()
    # uvicorn's handlers are in place; the lifespan is importing vLLM, resolving the model.
    server.wait_for("the lifespan", lambda: "Waiting for application startup" in server.log())
    assert_gone_after_sigterm(server)
    assert "during start-up" in server.log(), server.tail()


def test_sigterm_while_the_engine_starts(start_server: Callable[[], Tracked]) -> None:
    server = start_server()
    server.wait_for("the engine start-up log line", lambda: ENGINE_LOG_LINE in server.log())
    # The hard case: vLLM's engine core (a child process) exists and is loading.
    server.wait_for("the engine core process", server.engine_core_running)
    assert_gone_after_sigterm(server)
    assert "during start-up (starting the engine)" in server.log(), server.tail()
