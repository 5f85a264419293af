"""The first-impression set on the real default model: structure, never accuracy.

`tests/data/first_impression.jsonl` holds ~100 common-knowledge questions, each with its
acceptable answers and the title of the default-index article that holds the answer;
`bench/first_impression.py` reports accuracy on it (figures in docs/evaluation.md). Here a
small subset (one question per category) runs through the server, and each response is
checked against itself only: vLLM on CPU is not bit-stable across requests, and a model run
may miss any accuracy figure, so nothing here asserts what the model answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.first_impression import is_repetitive
from router.tags import INFORMATION, SEARCH, extract_last_answer, find_tag_blocks

DATA = Path(__file__).resolve().parent.parent / "data" / "first_impression.jsonl"
# The loop's default cap on the answer turn (LoopConfig.max_answer_tokens); a word is at
# least one token.
MAX_ANSWER_WORDS = 32


def load_set() -> list[dict]:
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def subset() -> list[dict]:
    """The first question of each category."""
    seen: dict[str, dict] = {}
    for row in load_set():
        seen.setdefault(row["category"], row)
    return list(seen.values())


def test_the_set_is_well_formed():
    rows = load_set()
    assert 90 <= len(rows) <= 120
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["question"].lower() for r in rows}) == len(rows)
    for row in rows:
        assert row["question"].endswith("?")
        assert row["answers"] and all(isinstance(a, str) and a.strip() for a in row["answers"])
        assert row["title"] and row["category"] in {"person", "place", "science", "date", "other"}


def test_every_gold_article_is_in_the_default_index_and_holds_the_answer():
    from router.engine.default_model import default_cache_dir
    from router.search.local_index import LocalIndexBackend, index_path

    index_dir = default_cache_dir() / "indexes" / "wiki-summaries"
    if not index_path(index_dir).is_file():
        pytest.skip("the default index is not built (run `ssrl index build` or `make serve`)")
    backend = LocalIndexBackend(index_dir)
    for row in load_set():
        hits = {d.title: d.text for d in backend.search_sync(row["title"], 20)}
        assert row["title"] in hits, f"{row['id']}: no article titled {row['title']!r}"
        text = hits[row["title"]].lower()
        assert any(a.lower() in text for a in row["answers"]), f"{row['id']}: answer not in the article"


def _check(choice, question: str) -> dict:
    trace = choice.model_extra.get("self_search")
    assert trace is not None, f"{question}: no self-search trace"
    assert trace["answered"], f"{question}: no answer turn ({trace['notes']})"
    reasoning = choice.message.model_extra["reasoning"]
    content = choice.message.content
    assert content == extract_last_answer(reasoning)
    # Guided mode writes the user's question again right before the answer it reads.
    assert f"</information>\n\nQuestion: {question}\n<answer>" in reasoning
    # The answer turn is one line, capped, and never a degenerate repetition's worth long.
    assert "\n" not in content
    assert len(content.split()) <= MAX_ANSWER_WORDS
    # Queries are one line; the content never carries an inserted document.
    for block in find_tag_blocks(reasoning):
        if block.tag == SEARCH:
            assert "\n" not in block.content(reasoning).strip()
    for search in trace["searches"]:
        assert "Doc 1(Title:" not in content
        for doc in search["documents"]:
            assert doc["snippet"] not in content or len(doc["snippet"]) < 40
    assert len([b for b in find_tag_blocks(reasoning) if b.tag == INFORMATION]) == len(
        [s for s in trace["searches"] if s["decision"] != "skipped"]
    )
    return trace


@pytest.mark.parametrize("policy", ["always", "never", None])
def test_first_impression_subset_is_well_formed(openai_client, model_name, policy):
    for row in subset():
        extra = {"self_search": {"policy": policy}} if policy else {}
        response = openai_client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": row["question"]}],
            temperature=0,
            extra_body=extra,
        )
        (choice,) = response.choices
        trace = _check(choice, row["question"])
        if policy == "always":
            assert trace["external_calls"] == len(trace["searches"]) >= 1
        if policy == "never":
            assert trace["external_calls"] == 0


def test_repetition_detector():
    assert is_repetitive("1609  1609 1609 1609")
    assert is_repetitive("the cat the cat the cat")
    assert not is_repetitive("William Shakespeare")
    assert not is_repetitive("1 April 1912")
