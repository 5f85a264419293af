"""The single pass against a client-side loop, on the native model: `python -m bench.native_client_loop`.

ssrl serving the merged native model (`ssrl serve --model smollm2-135m-ssrl`) reads one engine
request per trajectory until its policy calls the search API (issue 34). Against it: the loop an
agent writes today over vLLM's own OpenAI server with the same weights, as SSRL's and
Search-R1's inference scripts do: `/v1/completions` with stops at `</search>` and `</answer>`
and top-20 logprobs, the query's entropy read from them, the same policy (the adapter's tau on
the `max` aggregate), then either the search's documents appended or nothing (the model writes
its own block in the next call), the whole text re-sent each time.

Both call the same search API: a loopback Search-R1 retrieval server (`/retrieve`, the
`retriever` backend's wire format) over the default offline index, answering after 50 ms (a
search API's latency), with the documents the adapter reads (one, 150 characters; the user's
question sent after the query). Rounds alternate ssrl and the client at concurrency 1, 8 and 32
on the first-impression questions; trajectories per second, engine requests and external
calls per trajectory. Writes bench/results/native_client_loop.json and the
"native-client-loop" section of docs/benchmarks.md.

    .venv/bin/python -m bench.native_client_loop [--rounds 2] [--levels 1:12,8:32,32:64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, machine_info, machine_markdown, replace_markdown_section
from bench.serving import Server, free_port, vllm_argv
from clients.files import atomic_write_json
from router.engine.adapters import EMBEDDED_ADAPTER_NAME, EMBEDDED_ADAPTER_TAU
from router.engine.base import TokenLogprobs
from router.entropy import DEFAULT_ESTIMATOR, query_entropy
from router.prompts import GUIDED_MAX_DOC_CHARS, NATIVE_COMPACT
from router.search.base import Document
from router.search.providers.retriever import split_contents
from router.tags import (
    ANSWER_CLOSE,
    INFORMATION_CLOSE,
    INFORMATION_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    extract_last_answer,
    format_documents,
)

QUESTIONS = ROOT / "tests" / "data" / "first_impression.jsonl"
SEARCH_LATENCY_S = 0.05
MAX_TURNS = 3
MAX_TOKENS = 256
LOGPROBS = 20
TARGET = 1.3


# ----------------------------------------------------------------------------- the search API


class Retriever:
    """A loopback Search-R1 retrieval server over the default index, `latency` per call."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.port = free_port()
        self.calls = 0
        self._service: Any = None
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _retrieve(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if self._service is None:
            from server.search_config import build_search_service
            from server.settings import ServeSettings

            self._service = build_search_service(ServeSettings(search="local"))
        body = await request.json()
        await asyncio.sleep(self.latency)
        self.calls += 1
        results = []
        for query in body["queries"]:
            outcome = await self._service.search(query, int(body.get("topk", 1)))
            results.append(
                [
                    {
                        "document": {"id": str(i), "contents": f'"{d.title}"\n{d.text}'},
                        "score": d.score or 0.0,
                    }
                    for i, d in enumerate(outcome.documents)
                ]
            )
        return JSONResponse({"result": results})

    def start(self) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        app = Starlette(routes=[Route("/retrieve", self._retrieve, methods=["POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        threading.Thread(target=self._server.run, daemon=True).start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the loopback retriever did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True


# ----------------------------------------------------------------------------- the client loop


def _positions(logprobs: dict[str, Any], text: str, start: int, end: int) -> list[TokenLogprobs]:
    """The logprobs of the tokens that carry `text[start:end]` (the query), from a completion's
    `logprobs` (tokens, their offsets, their top-k)."""
    tokens, offsets = logprobs.get("tokens") or [], logprobs.get("text_offset") or []
    tops, chosen = logprobs.get("top_logprobs") or [], logprobs.get("token_logprobs") or []
    if not offsets:
        return []
    base = offsets[0]
    out = []
    for token, offset, top, lp in zip(tokens, offsets, tops, chosen, strict=False):
        lo, hi = max(offset - base, start), min(offset - base + len(token), end)
        if lo < hi and text[lo:hi].strip() and lp is not None:
            ranked = {hash(t): v for t, v in (top or {}).items()}
            out.append(TokenLogprobs(token_id=hash(token), logprob=lp, top=ranked))
    return out


class NativeClientLoop:
    """The client-side loop over vLLM's server: stops at `</search>`, decides, re-sends."""

    def __init__(self, client: httpx.AsyncClient, vllm_url: str, retriever_url: str, tokenizer: Any) -> None:
        self.client = client
        self.url = vllm_url + "/v1/completions"
        self.retriever_url = retriever_url + "/retrieve"
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)

    async def _search(self, query: str, question: str) -> str:
        sent = query if question in query else f"{query} {question}"
        response = await self.client.post(self.retriever_url, json={"queries": [sent], "topk": 1})
        response.raise_for_status()
        docs = [
            Document(*split_contents(hit["document"]["contents"])) for hit in response.json()["result"][0]
        ]
        return format_documents(docs, GUIDED_MAX_DOC_CHARS)

    async def run(self, question: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": NATIVE_COMPACT}, {"role": "user", "content": question}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        transcript, requests, external, searches = "", 0, 0, 0
        while True:
            body = {
                "model": EMBEDDED_ADAPTER_NAME,
                "prompt": prompt + transcript,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "stop": [SEARCH_CLOSE, ANSWER_CLOSE],
                "logprobs": LOGPROBS,
            }
            response = await self.client.post(self.url, json=body)
            response.raise_for_status()
            requests += 1
            choice = response.json()["choices"][0]
            text = choice["text"]
            transcript += text
            if choice.get("stop_reason") == ANSWER_CLOSE:
                transcript += ANSWER_CLOSE
                break
            if choice.get("stop_reason") != SEARCH_CLOSE:
                break  # EOS or length
            transcript += SEARCH_CLOSE
            opened = text.rfind(SEARCH_OPEN)
            if opened < 0:
                continue
            searches += 1
            if searches > MAX_TURNS:
                break
            start = opened + len(SEARCH_OPEN)
            query = text[start:].strip()
            positions = _positions(choice.get("logprobs") or {}, text, start, len(text))
            entropy = query_entropy(positions, self.vocab, DEFAULT_ESTIMATOR)
            if query and entropy.max > EMBEDDED_ADAPTER_TAU:
                external += 1
                docs = await self._search(query, question)
                transcript += f"\n\n{INFORMATION_OPEN}{docs}{INFORMATION_CLOSE}\n\n"
        return {
            "answer": extract_last_answer(transcript) or "",
            "requests": requests,
            "external": external,
        }


async def ssrl_run(client: httpx.AsyncClient, url: str, question: str) -> dict[str, Any]:
    body = {
        "model": EMBEDDED_ADAPTER_NAME,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    response = await client.post(url + "/v1/chat/completions", json=body)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    trace = choice.get("self_search") or {}
    return {
        "answer": choice["message"].get("content") or "",
        "requests": trace.get("engine_requests", 0),
        "external": trace.get("external_calls", 0),
    }


async def one_round(run: Any, questions: list[str], concurrency: int) -> dict[str, Any]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for q in questions:
        queue.put_nowait(q)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []

    async def worker() -> None:
        while not queue.empty():
            question = queue.get_nowait()
            try:
                rows.append(await run(question))
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "trajectories": len(rows),
        "errors": errors,
        "wall_s": round(wall, 3),
        "trajectories_per_s": round(len(rows) / wall, 4) if wall else 0.0,
        "requests_per_trajectory": round(statistics.mean(r["requests"] for r in rows), 3) if rows else 0.0,
        "external_per_trajectory": round(statistics.mean(r["external"] for r in rows), 3) if rows else 0.0,
    }


async def benchmark(
    ssrl_url: str, vllm_url: str, retriever_url: str, tokenizer: Any, plan: dict[int, int], rounds: int
) -> list[dict[str, Any]]:
    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines() if line.strip()]
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    out = []
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        loop = NativeClientLoop(client, vllm_url, retriever_url, tokenizer)
        systems = {"ssrl": lambda q: ssrl_run(client, ssrl_url, q), "client": loop.run}
        for run in systems.values():  # warm-up, unmeasured
            await one_round(run, questions[-4:], 4)
        block = 0
        for concurrency, n in plan.items():
            per: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
            for r in range(rounds):
                qs = [questions[(block * n + i) % len(questions)] for i in range(n)]
                block += 1
                order = list(systems) if r % 2 == 0 else list(systems)[::-1]
                for name in order:
                    result = await one_round(systems[name], qs, concurrency)
                    per[name].append(result)
                    print(
                        f"c={concurrency:<2} round {r} {name:<6} {result['trajectories_per_s']:.3f} traj/s "
                        f"requests {result['requests_per_trajectory']:.2f} external "
                        f"{result['external_per_trajectory']:.2f} errors {len(result['errors'])}",
                        flush=True,
                    )
            mean = {s: statistics.mean(x["trajectories_per_s"] for x in per[s]) for s in systems}
            out.append(
                {
                    "concurrency": concurrency,
                    "trajectories_per_round": n,
                    "rounds": per,
                    "trajectories_per_s": mean,
                    "ratio": mean["ssrl"] / mean["client"] if mean["client"] else None,
                }
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "## Native single pass against a client-side loop",
        "",
        machine_markdown(report["machine"]),
        f"Command: `{report['command']}`. Written by `bench/native_client_loop.py` (its docstring has "
        "the method): ssrl serving the merged native model (`--model smollm2-135m-ssrl`, one engine "
        "request per trajectory until the policy searches) against a client driving vLLM's own "
        "server with the same weights and stopping at every `</search>` (SSRL's and Search-R1's "
        "loops), the same policy (tau "
        f"{EMBEDDED_ADAPTER_TAU} on the `max` entropy), the same loopback search API answering in "
        f"{int(SEARCH_LATENCY_S * 1000)} ms, first-impression questions, temperature 0, rounds "
        "alternating.",
        "",
        "| concurrency | trajectories per round x rounds | ssrl traj/s | client traj/s | ratio | "
        "engine requests per trajectory (ssrl / client) | external calls per trajectory (ssrl / client) | target |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for level in report["levels"]:
        s, c = level["rounds"]["ssrl"], level["rounds"]["client"]

        req, ext = (
            f"{statistics.mean(x[key] for x in s):.2f} / {statistics.mean(x[key] for x in c):.2f}"
            for key in ("requests_per_trajectory", "external_per_trajectory")
        )
        ratio = level["ratio"]
        ok = "✓" if ratio is not None and ratio >= TARGET else "✗"
        lines.append(
            f"| {level['concurrency']} | {level['trajectories_per_round']} x {len(s)} | "
            f"{level['trajectories_per_s']['ssrl']:.3f} | {level['trajectories_per_s']['client']:.3f} | "
            f"{ratio:.2f} {ok} | {req} | {ext} | >= {TARGET} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.native_client_loop", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--levels", default="1:12,8:32,32:64", help="concurrency:trajectories per round")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "native_client_loop.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    plan = {int(c): int(n) for c, n in (item.split(":") for item in args.levels.split(","))}
    from transformers import AutoTokenizer

    from router.engine.merge import ensure_native_checkpoint

    merged = str(ensure_native_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(merged)
    retriever = Retriever(SEARCH_LATENCY_S)
    retriever.start()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    ssrl_port, vllm_port = free_port(), free_port()
    ssrl = Server(
        "ssrl",
        [
            sys.executable, "-m", "clients.cli", "serve", "--host", "127.0.0.1", "--port", str(ssrl_port),
            "--model", EMBEDDED_ADAPTER_NAME, "--enforce-eager", "--max-model-len", "2048",
            "--search", "retriever", "--search-option", f"retriever.base_url={retriever.url}",
        ],
        ssrl_port, logs / "native_client_loop.ssrl.log", env,
    )  # fmt: skip
    vllm = Server(
        "vllm",
        vllm_argv(sys.executable, merged, vllm_port, True),
        vllm_port,
        logs / "native_client_loop.vllm.log",
        env,
    )
    # The bench's vLLM serves the merged weights under the adapter's name.
    vllm.argv[vllm.argv.index("--served-model-name") + 1] = EMBEDDED_ADAPTER_NAME
    try:
        for server in (ssrl, vllm):
            server.start()
        for server in (ssrl, vllm):
            server.wait_ready(900)
        levels = asyncio.run(
            benchmark(ssrl.base_url, vllm.base_url, retriever.url, tokenizer, plan, args.rounds)
        )
    finally:
        for server in (ssrl, vllm):
            server.stop()
        retriever.stop()
    report = {
        "command": "python -m bench.native_client_loop "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "levels": levels,
        "search_latency_s": SEARCH_LATENCY_S,
        "tau": EMBEDDED_ADAPTER_TAU,
    }
    atomic_write_json(args.out, report)
    text = markdown(report)
    if str(args.markdown):
        replace_markdown_section(args.markdown, "native-client-loop", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
