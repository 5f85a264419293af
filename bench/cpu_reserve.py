"""ssrl alone on the CPU with and without the core vLLM's CPU backend reserves for its scheduler.

vLLM's CPU backend keeps one core for the engine core process and binds the model's OpenMP
threads to the others; on a machine with at most `CPU_SHARE_RESERVED_CORE_MAX_CORES` usable
cores ssrl lets the model's threads use every core instead (router/engine/vllm_engine.py:
`cpu_engine_env`). This starts `ssrl serve` alone (no other server on the machine) once per
variant, set explicitly through `VLLM_CPU_NUM_OF_RESERVED_CPU` (an operator's value always
wins over ssrl's choice), and measures streaming chat as bench/serving.py does (64 tokens,
temperature 0): output tokens/s and p50 time to first token per round and level.

    .venv/bin/python -m bench.cpu_reserve                       # c = 1 and 8, 2 rounds
    .venv/bin/python -m bench.cpu_reserve --concurrency 1,8,32 --variants reserve0,reserve1

Writes bench/results/cpu_reserve.json; docs/benchmarks.md quotes it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info
from bench.serving import (
    DEFAULT_QUESTIONS,
    Server,
    free_port,
    load_prompts,
    resolve_model_dir,
    run_round,
    server_env,
    ssrl_argv,
)
from clients.files import atomic_write_json
from router.engine.vllm_engine import RESERVED_CPU_ENV

VARIANTS = {
    "reserve1": {RESERVED_CPU_ENV: "1"},  # vLLM's CPU default: one core for the scheduler
    "reserve0": {RESERVED_CPU_ENV: "0"},  # ssrl's default on <= 2 usable cores
}
REQUESTS = {1: 8, 8: 32}
MAX_TOKENS = 64


def measure(server: Server, prompts: list[str], levels: list[int], rounds: int) -> dict[str, Any]:
    asyncio.run(run_round(server.base_url, prompts, 4, 4, 16, 300, 600))  # warm-up
    out: dict[str, Any] = {}
    for r in range(rounds):
        for c in levels:
            n = REQUESTS.get(c, 2 * c)
            result = asyncio.run(
                run_round(server.base_url, prompts[r * 8 :] + prompts, n, c, MAX_TOKENS, 300, 900)
            )
            ok = [x for x in result["requests"] if x["ok"]]
            ttfts = sorted(x["ttft"] for x in ok if x["ttft"] is not None)
            out.setdefault(str(c), []).append(
                {
                    "ok": len(ok),
                    "requests": n,
                    "tokens_per_s": sum(x["completion_tokens"] for x in ok) / result["wall_s"],
                    "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_reserve", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_reserve.json")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    model_dir = resolve_model_dir(None)
    prompts = load_prompts(DEFAULT_QUESTIONS, 64)
    results: dict[str, Any] = {}
    for name in args.variants.split(","):
        env = server_env(match_ssrl_engine=False)
        env.update(VARIANTS[name])
        port = free_port()
        log = Path(tempfile.mkdtemp(prefix="ssrl-bench-cpu-reserve-")) / "ssrl.log"
        server = Server(name, ssrl_argv(sys.executable, model_dir, port, True), port, log, env)
        server.start()
        try:
            server.wait_ready(600)
            results[name] = measure(server, prompts, levels, args.rounds)
        finally:
            server.stop()
        print(name, json.dumps(results[name]), flush=True)
    atomic_write_json(
        args.out,
        {
            "benchmark": "cpu_reserve: ssrl alone, vLLM's reserved scheduler core vs shared cores",
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "levels": levels,
            "rounds": args.rounds,
            "max_tokens": MAX_TOKENS,
            "results": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
