"""Build time and query latency of the local FTS5 index.

Default: the offline Wikipedia summaries corpus (the default index), queried with NQ-open dev
questions; also reports how often a gold answer occurs in the top-k passages.
``--docs N``: a synthetic corpus of N documents whose words are drawn from the summaries'
own word frequencies and document lengths, so that the same questions hit posting lists of
realistic relative size at scale.

    python bench/bench_local_index.py                  # the default index (~10k docs)
    python bench/bench_local_index.py --docs 1000000   # synthetic, 1M docs

Prints a table and merges the run into bench/results/local_index.json (keyed by corpus).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sqlite3
import statistics
import string
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.search.default_corpus import (
    WIKI_PACKAGE,
    WIKI_VERSION,
    fetch_wiki_summaries,
    wiki_summaries_to_jsonl,
)
from router.search.local_index import LocalIndexBackend, build_index, fts_query

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_QUESTIONS = Path("/work/shared/data/qa/nq_open_dev.jsonl")


def load_questions(path: Path, n: int) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]


def normalize(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, folded white space."""
    s = "".join(c for c in s.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def synthesize(summaries_json: Path, out: Path, docs: int, seed: int) -> None:
    """Write ``docs`` JSONL documents sampled from the summaries' unigram distribution."""
    entries = json.loads(summaries_json.read_text(encoding="utf-8"))
    counts: Counter[str] = Counter()
    lengths: list[int] = []
    for e in entries.values():
        words = (e.get("extract") or "").split()
        if words:
            counts.update(words)
            lengths.append(len(words))
    vocab = list(counts)
    cum: list[int] = []
    total = 0
    for w in vocab:
        total += counts[w]
        cum.append(total)
    rng = random.Random(seed)
    with open(out, "w", encoding="utf-8") as f:
        for i in range(docs):
            words = rng.choices(vocab, cum_weights=cum, k=rng.choice(lengths))
            title = " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(1, 4)))
            doc = {"id": f"s{i}", "title": title, "text": " ".join(words)}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_ms[min(len(sorted_ms) - 1, max(0, round(q / 100 * len(sorted_ms)) - 1))]


def measure(index_dir: Path, questions: list[dict[str, Any]], k: int, check_answers: bool) -> dict[str, Any]:
    backend = LocalIndexBackend(index_dir)
    for q in questions[:20]:  # warm the page cache and the connection pool
        backend.search_sync(q["question"], k)
    sync_ms: list[float] = []
    hits = 0
    for q in questions:
        t0 = time.perf_counter()
        docs = backend.search_sync(q["question"], k)
        sync_ms.append((time.perf_counter() - t0) * 1000)
        text = normalize(" ".join(f"{d.title} {d.text}" for d in docs))
        if any((a := normalize(ans)) and a in text for ans in q["answers"]):
            hits += 1

    async def run_async() -> list[float]:
        out = []
        for q in questions:
            t0 = time.perf_counter()
            await backend.search(q["question"], k)
            out.append((time.perf_counter() - t0) * 1000)
        await backend.aclose()
        return out

    async_ms = asyncio.run(run_async())
    sync_ms.sort()
    async_ms.sort()
    return {
        "queries": len(questions),
        "k": k,
        "p50_ms": round(percentile(sync_ms, 50), 3),
        "p90_ms": round(percentile(sync_ms, 90), 3),
        "p99_ms": round(percentile(sync_ms, 99), 3),
        "mean_ms": round(statistics.fmean(sync_ms), 3),
        "max_ms": round(sync_ms[-1], 3),
        "async_p50_ms": round(percentile(async_ms, 50), 3),
        "async_p99_ms": round(percentile(async_ms, 99), 3),
        # Loose recall: a normalised gold answer occurs in the top-k titles and texts.
        "answer_in_top_k": round(hits / len(questions), 3) if check_answers else None,
        "mean_query_terms": round(
            statistics.fmean(fts_query(q["question"]).count(" OR ") + 1 for q in questions), 2
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--docs", type=int, default=0, help="synthetic corpus size (0: real corpus)")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".ssrl-cache")
    ap.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    ap.add_argument("--num-queries", type=int, default=200)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "local_index.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus and index")
    args = ap.parse_args()

    work = args.cache_dir / "bench"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summaries = fetch_wiki_summaries(args.cache_dir / "downloads")
    fetch_s = time.perf_counter() - t0

    if args.docs:
        label = f"synthetic-{args.docs}"
        corpus = work / f"{label}.jsonl"
        t0 = time.perf_counter()
        synthesize(summaries, corpus, args.docs, args.seed)
        prep_s = time.perf_counter() - t0
        source = f"synthetic {args.docs} docs from {WIKI_PACKAGE}=={WIKI_VERSION} unigrams"
    else:
        label = "wiki-summaries"
        corpus = work / f"{label}.jsonl"
        t0 = time.perf_counter()
        wiki_summaries_to_jsonl(summaries, corpus)
        prep_s = time.perf_counter() - t0
        source = f"{WIKI_PACKAGE}=={WIKI_VERSION}"

    index_dir = work / f"index-{label}"
    t0 = time.perf_counter()
    info = build_index(corpus, index_dir, source=source, progress=sys.stderr.isatty())
    build_s = time.perf_counter() - t0
    size_mb = info.path.stat().st_size / 1e6

    questions = load_questions(args.questions, args.num_queries)
    lat = measure(index_dir, questions, args.k, check_answers=not args.docs)
    result: dict[str, Any] = {
        "corpus": label,
        "documents": info.documents,
        "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
        "index_mb": round(size_mb, 1),
        "fetch_s": round(fetch_s, 2),
        "prepare_s": round(prep_s, 2),
        "build_s": round(build_s, 2),
        "build_docs_per_s": round(info.documents / build_s),
        "questions": str(args.questions),
        **lat,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
    }
    if not args.keep:
        corpus.unlink(missing_ok=True)
        info.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            index_dir.rmdir()

    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    runs[label] = result
    args.out.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
