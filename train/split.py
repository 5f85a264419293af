"""Training questions that share nothing with what the project evaluates on.

The questions are written from the default corpus by the dev set's own templates
(`router.search.devset.candidates`), one per article, over the articles the evaluation sets do
not use. "Shares nothing" is checked three ways, each a reason to drop a candidate:

* **article**: its source article is the gold article of an evaluation question
  (the dev set's ``gold_title``, the first-impression set's ``title``);
* **entity**: one of its answers (or its article's title) is an evaluation answer or an
  evaluation article's title, compared after SQuAD normalisation, so "the Nile" and "Nile" meet;
* **question**: its question is an evaluation question (normalised).

Pure: rows in, rows out, the same rows for the same inputs and seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from router.search.devset import CorpusDoc, candidates, country_titles, plain_title
from router.tags import normalize_answer

__all__ = ["EvalKeys", "eval_keys", "heldout_questions", "leak_reason"]


class EvalKeys:
    """What a training question must not share with the evaluation sets (normalised)."""

    def __init__(self, articles: set[str], entities: set[str], questions: set[str]) -> None:
        self.articles = articles
        self.entities = entities
        self.questions = questions


def _norm(text: str) -> str:
    return normalize_answer(text)


def eval_keys(eval_rows: Iterable[Mapping[str, Any]]) -> EvalKeys:
    """The articles, entities and questions of evaluation rows (dev set or first-impression
    rows: ``gold_title`` or ``title``, ``answers``, ``question``)."""
    articles: set[str] = set()
    entities: set[str] = set()
    questions: set[str] = set()
    for row in eval_rows:
        title = row.get("gold_title") or row.get("title")
        if isinstance(title, str) and title:
            articles.add(_norm(title))
            entities.add(_norm(plain_title(title)))
        for answer in row.get("answers") or ():
            if isinstance(answer, str) and _norm(answer):
                entities.add(_norm(answer))
        question = row.get("question")
        if isinstance(question, str):
            questions.add(_norm(question))
    return EvalKeys(articles, entities, questions)


def leak_reason(row: Mapping[str, Any], keys: EvalKeys) -> str | None:
    """Why a candidate training row shares something with the evaluation sets, or None."""
    title = str(row["gold_title"])
    if _norm(title) in keys.articles:
        return "article"
    names = [plain_title(title), *row["answers"]]
    if any(_norm(name) in keys.entities for name in names):
        return "entity"
    if _norm(str(row["question"])) in keys.questions:
        return "question"
    return None


def heldout_questions(
    docs: Sequence[CorpusDoc], eval_rows: Iterable[Mapping[str, Any]], size: int, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Up to ``size`` training questions (one per article, none leaking) and the count of
    candidates dropped for each leak reason.

    Rows: ``{id, question, answers, gold_title, template, passage}``; the passage is the
    article's text, which the corpus-assembled trajectories draw their information from.
    """
    keys = eval_keys(eval_rows)
    ordered = sorted(docs, key=lambda d: d.title)
    countries = country_titles(ordered)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    dropped: dict[str, int] = {"article": 0, "entity": 0, "question": 0}
    for doc in ordered:
        made = candidates(doc, countries)
        if not made:
            continue
        row = made[rng.randrange(len(made))]
        reason = leak_reason(row, keys)
        if reason is not None:
            dropped[reason] += 1
            continue
        rows.append(
            {
                "id": f"train-{len(rows):05d}",
                "question": row["question"],
                "answers": list(row["answers"]),
                "gold_title": doc.title,
                "template": row["template"],
                "passage": doc.text,
            }
        )
    rng.shuffle(rows)
    chosen = rows[:size]
    for i, row in enumerate(chosen):
        row["id"] = f"train-{i:05d}"
    return chosen, dropped
