"""`ssrl devset build`: the development QA set of the offline corpus (router/search/devset.py).

Registered in `clients.cli.BUILTIN` like the commands of server/commands.py, and held to the
same rule: only the standard library at module level, the builder imported when it runs.
`ssrl eval --data dev` runs this command itself when the set is not in the cache yet.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["devset_command", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    devset = subparsers.add_parser(
        "devset", help="Build the development QA set whose answers are in the default index."
    )
    devset_commands = devset.add_subparsers(dest="devset_command", required=True)
    build = devset_commands.add_parser(
        "build",
        help="Write questions generated from the offline Wikipedia summaries (JSONL, atomically).",
        description="Generate questions whose answer is stated in one document of the default "
        "index, graded by how often other summaries mention the entity. The same corpus, "
        "--size and --seed always give the same file (docs/evaluation.md).",
    )
    build.add_argument(
        "--out",
        default=None,
        help="Output JSONL (default: CACHE/devsets/dev.jsonl, read by `ssrl eval --data dev`).",
    )
    build.add_argument("--size", type=int, default=300, help="Questions (default 300).")
    build.add_argument("--seed", type=int, default=0, help="Sampling seed (default 0).")
    build.add_argument(
        "--corpus", default=None, help="Index JSONL ({title, text} per line) instead of the default corpus."
    )
    build.add_argument(
        "--cache-dir", default=None, help="Cache directory (default: SSRL_CACHE_DIR or ~/.cache/ssrl)."
    )
    devset.set_defaults(handler=devset_command)


def devset_command(args: dict[str, Any]) -> int:
    from router.engine.default_model import default_cache_dir
    from router.search.devset import DEVSET_VERSION, build_devset, ensure_devset, read_corpus, write_devset

    if args["size"] < 1:
        print("ssrl devset build: --size must be at least 1", file=sys.stderr)
        return 2
    cache_dir = Path(args["cache_dir"]).expanduser() if args["cache_dir"] else default_cache_dir()
    out = Path(args["out"]).expanduser() if args["out"] else None
    try:
        if args["corpus"]:
            rows = build_devset(read_corpus(Path(args["corpus"])), size=args["size"], seed=args["seed"])
            path = out or cache_dir / "devsets" / f"{Path(args['corpus']).stem}-dev.jsonl"
            write_devset(path, rows)
            count = len(rows)
        else:
            path, count = ensure_devset(cache_dir, out, size=args["size"], seed=args["seed"], rebuild=True)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"ssrl devset build: {exc}", file=sys.stderr)
        return 1
    grades = Counter(row["grade"] for row in _read_rows(path))
    per_grade = ", ".join(f"{g} {n}" for g, n in sorted(grades.items()))
    print(f"{count} questions written to {path} (builder v{DEVSET_VERSION}; {per_grade})")
    return 0


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
