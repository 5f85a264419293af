"""Make the native adapter's training data: `python -m train.make_data`.

Three steps, each resumable, all outputs under ``train/data/`` (committed):

1. ``questions.jsonl``: held-out questions from the default corpus (`train.split`), none
   sharing an article, answer entity or question with the dev set or the first-impression set.
2. ``guided.jsonl``: the server itself answers the first ``--guided`` of them in guided mode
   (the embedded instruct model with its worked examples), alternating policy ``always``
   (documents inserted) and ``never`` (the model fills the information block itself). Every
   outcome is written as it arrives, so a rerun skips the questions already asked. Needs a
   running server (``--base-url``).
3. ``forward.jsonl``: forward questions (`train.forward`: "Who wrote Hamlet?", answered by a
   name in the article's text rather than by its title), held out the same way.
4. ``trajectories.jsonl``: the training set. Guided runs whose answer was right (rejection
   sampling), re-rendered in the native layout; every forward question twice (once with its
   sentence inserted as a document, once as the model's own block); then trajectories
   assembled from the corpus for the remaining questions (the query written from the
   question, the article's first sentence as self-written information, or the article as an
   inserted document), until ``--size`` rows. Each row says its ``source``.

Seeded and deterministic given the guided outcomes; the engine is not (vLLM on CPU), which
is why those outcomes are kept in a file rather than re-made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from router.scoring import best_exact_match
from router.search.devset import (
    CorpusDoc,
    country_titles,
    ensure_devset,
    plain_title,
    read_corpus,
    split_sentences,
    write_devset,
)
from router.tags import normalize_answer
from train.forward import TEMPLATES, TRAINED_TEMPLATES, city_titles, forward_candidates, person_titles
from train.render import Trajectory, query_from_question, render, render_documents
from train.split import eval_keys, heldout_questions, leak_reason

DATA_DIR = Path(__file__).parent / "data"
FIRST_IMPRESSION = Path(__file__).parent.parent / "tests" / "data" / "first_impression.jsonl"
SEED = 0
# The documents the server inserts for the embedded models (router/prompts.py: one short
# document reads better than three long ones at 135M).
DOC_CHARS = 150


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _cache_dir() -> Path:
    from router.engine.default_model import default_cache_dir

    return default_cache_dir()


def _corpus_and_eval_rows() -> tuple[Path, list[dict[str, Any]]]:
    from router.search.default_corpus import DEFAULT_INDEX_NAME, WIKI_VERSION

    dev_path, _ = ensure_devset(_cache_dir())
    corpus = _cache_dir() / "corpora" / f"{DEFAULT_INDEX_NAME}-{WIKI_VERSION}.jsonl"
    return corpus, read_jsonl(dev_path) + read_jsonl(FIRST_IMPRESSION)


def make_questions(size: int) -> Path:
    out = DATA_DIR / "questions.jsonl"
    if out.is_file():
        return out
    corpus, eval_rows = _corpus_and_eval_rows()
    rows, dropped = heldout_questions(read_corpus(corpus), eval_rows, size, SEED)
    write_devset(out, rows)
    print(f"questions: {len(rows)} written to {out}; dropped as leaks: {dropped}", file=sys.stderr)
    return out


def forward_questions(
    docs: list[CorpusDoc], eval_rows: list[dict[str, Any]], templates: Sequence[str] = TRAINED_TEMPLATES
) -> list[dict[str, Any]]:
    """Every forward question of the corpus that shares nothing with the evaluation sets."""
    titles = {plain_title(doc.title) for doc in docs}
    persons = person_titles(docs)
    cities = city_titles(docs)
    countries = set(country_titles(docs))
    keys = eval_keys(eval_rows)
    rng = random.Random(SEED)
    rows: list[dict[str, Any]] = []
    for doc in sorted(docs, key=lambda d: d.title):
        made = forward_candidates(doc, titles, persons, cities, countries, templates)
        # One question per article, as the corpus templates (an element makes two).
        for row in [made[rng.randrange(len(made))]] if made else []:
            # The inserted document is cut to DOC_CHARS: it must still hold the answer.
            if leak_reason(row, keys) is None and row["answers"][0] in row["sentence"][: DOC_CHARS - 10]:
                rows.append(
                    {
                        "id": f"fwd-{len(rows):04d}",
                        "question": row["question"],
                        "answers": row["answers"],
                        "gold_title": row["gold_title"],
                        "template": row["template"],
                        "passage": row["sentence"],
                    }
                )
    return rows


def make_forward(templates: Sequence[str] = TRAINED_TEMPLATES) -> Path:
    out = DATA_DIR / "forward.jsonl"
    if out.is_file():
        return out
    corpus, eval_rows = _corpus_and_eval_rows()
    rows = forward_questions(read_corpus(corpus), eval_rows, templates)
    write_devset(out, rows)
    print(f"forward questions: {len(rows)} written to {out}", file=sys.stderr)
    return out


def guided_policy(index: int) -> str:
    """Half the guided runs insert documents, half let the model fill the block."""
    return "always" if index % 2 == 0 else "never"


async def _ask(client: httpx.AsyncClient, model: str, row: Mapping[str, Any], policy: str) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": row["question"]}],
        "max_tokens": 256,
        "temperature": 0,
        "self_search": {"mode": "guided", "policy": policy, "max_turns": 1},
    }
    response = await client.post("/chat/completions", json=body)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    answer = choice["message"].get("content") or ""
    searches = (choice.get("self_search") or {}).get("searches") or []
    first = searches[0] if searches else {}
    return {
        "id": row["id"],
        "policy": policy,
        "answer": answer,
        "right": best_exact_match(answer, row["answers"]),
        "query": first.get("query", ""),
        "decision": first.get("decision"),
        "fallback": first.get("fallback"),
        "information": first.get("information", ""),
    }


async def run_guided(questions: list[dict[str, Any]], base_url: str, model: str, concurrency: int) -> Path:
    out = DATA_DIR / "guided.jsonl"
    done = {r["id"]: r for r in read_jsonl(out)}
    todo = [(i, q) for i, q in enumerate(questions) if q["id"] not in done]
    print(f"guided: {len(done)} done, {len(todo)} to ask", file=sys.stderr)
    from tqdm import tqdm

    lock = asyncio.Lock()
    queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = tqdm(total=len(todo), desc="guided runs", unit="q")
    headers = (
        {"Authorization": f"Bearer {os.environ['SSRL_API_KEY']}"} if os.environ.get("SSRL_API_KEY") else {}
    )

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            index, row = queue.get_nowait()
            try:
                result = await _ask(client, model, row, guided_policy(index))
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                result = {
                    "id": row["id"],
                    "policy": guided_policy(index),
                    "error": str(exc)[:200],
                    "right": False,
                }
            async with lock:
                done[row["id"]] = result
                # Appended line by line: an interrupted run keeps every answer it got.
                with open(out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(result, ensure_ascii=False) + "\n")
            bar.update(1)

    async with httpx.AsyncClient(base_url=base_url, timeout=600, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    bar.close()
    return out


def _first_sentence(passage: str) -> str:
    sentences = split_sentences(passage)
    return sentences[0] if sentences else passage[:200]


def _shares_word(query: str, text: str) -> bool:
    words = {w for w in normalize_answer(text).split() if len(w) > 2}
    return any(w in words for w in normalize_answer(query).split() if len(w) > 2)


def from_guided(row: Mapping[str, Any], question: Mapping[str, Any]) -> Trajectory | None:
    """A right guided run in the native layout, or None when it cannot be one."""
    if not row.get("right") or row.get("fallback") or not row.get("query") or not row.get("information"):
        return None
    inserted = row.get("decision") == "external"
    # Guided mode sends the backend the user's question after the query, so a run can find the
    # right document with a query that names nothing of it; native mode sends the query alone.
    if inserted and not _shares_word(row["query"], question["question"] + " " + question["gold_title"]):
        return None
    gold = next((a for a in question["answers"] if best_exact_match(row["answer"], [a])), row["answer"])
    return render(row["query"], row["information"], gold, inserted=inserted)


def assembled(
    question: Mapping[str, Any], rng: random.Random, inserted_share: float, inserted: bool | None = None
) -> tuple[Trajectory, str]:
    """A trajectory built from the corpus: the model's query, the article's text, the gold
    (``inserted`` forces the kind of information; None draws it)."""
    query = query_from_question(question["question"])
    answer = question["answers"][0]
    if inserted if inserted is not None else rng.random() < inserted_share:
        docs = render_documents([(question["gold_title"], question["passage"])], DOC_CHARS)
        return render(query, docs, answer, inserted=True), "corpus-inserted"
    # Written in the layout of inserted documents, as the guided model writes its own blocks:
    # one layout for both kinds of information is one thing less for a 135M model to learn.
    own = render_documents([(question["gold_title"], _first_sentence(question["passage"]))], DOC_CHARS * 2)
    return render(query, own, answer, inserted=False), "corpus-self"


def _row(question: Mapping[str, Any], trajectory: Trajectory, source: str) -> dict[str, Any]:
    return {
        "id": question["id"],
        "question": question["question"],
        "answers": question["answers"],
        "source": source,
        "text": trajectory.text,
        "masked": [list(span) for span in trajectory.masked],
    }


def make_trajectories(
    questions: list[dict[str, Any]],
    size: int,
    inserted_share: float,
    forward: Sequence[Mapping[str, Any]] = (),
) -> Path:
    out = DATA_DIR / "trajectories.jsonl"
    guided = {r["id"]: r for r in read_jsonl(DATA_DIR / "guided.jsonl")}
    rng = random.Random(SEED)
    rows: list[dict[str, Any]] = []
    # Both kinds of information for each forward question: they are few, and they are the
    # only rows whose answer is not the title of the document read.
    for question in forward:
        for inserted in (True, False):
            trajectory, source = assembled(question, rng, inserted_share, inserted=inserted)
            rows.append(_row(question, trajectory, "forward-" + source.split("-", 1)[1]))
    for question in questions:
        if len(rows) >= size:
            break
        run = guided.get(question["id"])
        trajectory = from_guided(run, question) if run else None
        if trajectory is not None:
            assert run is not None
            source = "guided-inserted" if run.get("decision") == "external" else "guided-self"
        elif run is not None and "error" not in run:
            continue  # a wrong guided answer: rejected, and its question is not reused
        else:
            trajectory, source = assembled(question, rng, inserted_share)
        rows.append(_row(question, trajectory, source))
    write_devset(out, rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    print(f"trajectories: {len(rows)} written to {out}: {counts}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.make_data", description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=1600, help="held-out questions to write")
    parser.add_argument("--guided", type=int, default=200, help="questions the server answers in guided mode")
    parser.add_argument("--size", type=int, default=1000, help="training trajectories to keep")
    parser.add_argument(
        "--inserted-share", type=float, default=0.4, help="corpus rows with inserted documents"
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="a running ssrl server")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-guided", action="store_true", help="use only corpus-assembled trajectories")
    parser.add_argument(
        "--forward-templates",
        default=",".join(TRAINED_TEMPLATES),
        help=f"forward question templates (of {', '.join(TEMPLATES)}); delete data/forward.jsonl to remake it",
    )
    args = parser.parse_args(argv)
    questions = read_jsonl(make_questions(args.questions))
    if not args.skip_guided and args.guided > 0:
        asyncio.run(run_guided(questions[: args.guided], args.base_url, args.model, args.concurrency))
    templates = [t.strip() for t in args.forward_templates.split(",") if t.strip()]
    unknown = sorted(set(templates) - set(TEMPLATES))
    if unknown:
        parser.error(f"--forward-templates: unknown {', '.join(unknown)}; known: {', '.join(TEMPLATES)}")
    make_trajectories(questions, args.size, args.inserted_share, read_jsonl(make_forward(templates)))


if __name__ == "__main__":
    main()
