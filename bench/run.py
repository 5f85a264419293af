"""`make bench`: run a benchmark by name (default: serving), passing the rest of the flags on.

.venv/bin/python -m bench.run                              # serving, default options
.venv/bin/python -m bench.run serving --enforce-eager      # ssrl vs vLLM OpenAI server
.venv/bin/python -m bench.run local-index --docs 100000    # local FTS5 index
.venv/bin/python -m bench.run startup                      # start-up and tok/s, eager vs compiled
.venv/bin/python -m bench.run profile                      # py-spy of both servers under load
.venv/bin/python -m bench.run suite --skip serving         # every part (`make bench`)
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "serving": "bench.serving",
    "local-index": str(HERE / "bench_local_index.py"),
    "loop": "bench.loop",
    "startup": "bench.startup",
    "client-loop": "bench.client_loop",
    "profile": "bench.profile_serving",
    "cpu-reserve": "bench.cpu_reserve",
    "suite": "bench.suite",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nbenchmarks: " + ", ".join(BENCHMARKS))
        return 0
    name = "serving"
    if argv and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; choose from: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    target = BENCHMARKS[name]
    if name == "serving":
        from bench.serving import main as serving_main

        return serving_main(argv)
    sys.argv = [target, *argv]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
