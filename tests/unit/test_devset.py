"""The development QA set built from the offline corpus (router/search/devset.py).

A small synthetic corpus stands in for the 10,033 summaries: entities written like Wikipedia
leads, and filler documents that mention them a chosen number of times, so each grade has
members. The command (`ssrl devset build`) and the `ssrl eval --data dev` preset are checked
without the network or the real corpus.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from router.search.devset import (
    GRADE_CUTS,
    GRADES,
    TEMPLATES,
    CorpusDoc,
    build_devset,
    candidates,
    country_titles,
    grade_of,
    leaks,
    mention_counts,
    read_corpus,
    split_sentences,
    write_devset,
)

ENTITIES = [
    CorpusDoc(
        "Alpha Spire",
        "Alpha Spire is the tallest tower in the harbour district of Quxville. It was built in 1901.",
    ),
    CorpusDoc(
        "Bertram Hollis",
        "Bertram Hollis was an English chemist and inventor. He is best known for the discovery of "
        "the blue garnet. His work shaped mineralogy.",
    ),
    CorpusDoc(
        "Carrow",
        "Carrow is a small city in Freedonia, on the banks of a slow river. It is famous for its bridges.",
    ),
    CorpusDoc(
        "Freedonia",
        "Freedonia is a landlocked country in the middle of the Plains. It borders the sea to nowhere.",
    ),
    CorpusDoc(
        "Delta Society",
        "The Delta Society is a learned society of surveyors. It was founded in 1834 by a group of "
        "engineers. The society publishes maps.",
    ),
    CorpusDoc(
        "Western honey bee",
        "The western honey bee is the most common of the species of honey bees worldwide.",
    ),
]


def _fillers(counts: dict[str, int], total: int) -> list[CorpusDoc]:
    """``total`` documents with no question in them; filler i names the entities with count > i."""
    docs = []
    for i in range(total):
        names = [name for name, count in counts.items() if count > i]
        docs.append(CorpusDoc(f"Filler {i}", "A list of names: " + ", ".join(names) + "."))
    return docs


# Mentions per entity, one per grade: famous (>= 40), known (>= 10), niche (>= 3), obscure.
MENTIONS = {"Alpha Spire": 45, "Bertram Hollis": 12, "Delta Society": 4, "Carrow": 0}


def corpus() -> list[CorpusDoc]:
    return ENTITIES + _fillers(MENTIONS, 45)


def test_split_sentences_keeps_abbreviations_and_initials() -> None:
    text = "John F. Kennedy was the 35th president of the U.S. Army of no one. He was born in 1917."
    assert split_sentences(text) == [
        "John F. Kennedy was the 35th president of the U.S. Army of no one",
        "He was born in 1917",
    ]


def test_each_template_on_a_wikipedia_like_lead() -> None:
    countries = country_titles(corpus())
    assert countries == {"Freedonia": "Freedonia"}
    made = {doc.title: candidates(doc, countries) for doc in ENTITIES}
    alpha = {row["template"]: row for row in made["Alpha Spire"]}
    assert alpha["definition_the"]["question"] == (
        "What is the tallest tower in the harbour district of Quxville?"
    )
    assert alpha["definition_the"]["answers"] == ["Alpha Spire"]
    assert alpha["year"]["question"] == "In what year was Alpha Spire built?"
    assert alpha["year"]["answers"] == ["1901"]
    (hollis,) = made["Bertram Hollis"]
    assert hollis["template"] == "definition_clue"
    assert hollis["question"] == (
        "Which English chemist and inventor is best known for the discovery of the blue garnet?"
    )
    country = [row for row in made["Carrow"] if row["template"] == "country"]
    assert country == [
        {
            "question": "In which country is Carrow located?",
            "answers": ["Freedonia"],
            "gold_title": "Carrow",
            "template": "country",
        }
    ]
    delta = {row["template"]: row for row in made["Delta Society"]}
    assert delta["year"]["question"] == "In what year was Delta Society founded?"
    assert delta["year"]["answers"] == ["1834"]
    # "the most common of the species of honey bees" gives the title away: no question.
    assert made["Western honey bee"] == []
    # A country is not asked "in which country" it lies.
    assert all(row["template"] != "country" for row in made["Freedonia"])


def test_leaks_folds_plurals_and_derived_words() -> None:
    assert leaks("Honey bee", "Which insect makes honey?")
    assert leaks("Western honey bee", "the species of honey bees")
    assert leaks("Australia", "Which country covers the Australian continent?")
    assert leaks("Exploration", "What is the process of exploring?")
    assert not leaks("Sweden", "Which Nordic country borders Norway?")
    assert not leaks("The Who", "Which band of the 1960s smashed guitars?")  # articles carry no name


def test_mention_counts_count_other_documents_once_each() -> None:
    docs = [
        CorpusDoc("Mercury (planet)", "Mercury is the closest planet to the Sun. Mercury is small."),
        CorpusDoc("Sun", "The Sun is a star. Mercury and Venus orbit the Sun."),
        CorpusDoc("Venus", "Venus is a planet."),
    ]
    counts = mention_counts(docs)
    # The own document never counts, repetition inside one document counts once.
    assert counts == {"Mercury (planet)": 1, "Sun": 1, "Venus": 1}


def test_grade_cut_points() -> None:
    assert [grade_of(n) for n in (0, 2, 3, 9, 10, 39, 40, 10_000)] == [
        "obscure",
        "obscure",
        "niche",
        "niche",
        "known",
        "known",
        "famous",
        "famous",
    ]
    assert len(GRADES) == len(GRADE_CUTS) and list(GRADE_CUTS) == sorted(GRADE_CUTS, reverse=True)


def test_grades_cover_every_bucket_on_a_synthetic_corpus() -> None:
    rows = build_devset(corpus(), size=100, seed=0)
    by_title = {row["gold_title"]: row for row in rows}
    assert {row["grade"] for row in rows} == set(GRADES)
    for title, mentions in MENTIONS.items():
        assert by_title[title]["signal"]["mentions"] == mentions
        assert by_title[title]["grade"] == grade_of(mentions)
    # With room for one question per grade, every grade still gets one.
    assert {row["grade"] for row in build_devset(corpus(), size=len(GRADES), seed=3)} == set(GRADES)


def test_rows_have_the_eval_shape_and_a_corpus_gold_title() -> None:
    docs = corpus()
    titles = {doc.title for doc in docs}
    text_of = {doc.title: doc.text for doc in docs}
    rows = build_devset(docs, size=100, seed=0)
    assert rows
    assert len({row["id"] for row in rows}) == len(rows)
    assert len({row["gold_title"] for row in rows}) == len(rows)  # one question per document
    for row in rows:
        assert set(row) == {"id", "question", "answers", "gold_title", "grade", "signal", "template"}
        assert isinstance(row["question"], str) and row["question"].endswith("?")
        assert row["answers"] and all(isinstance(a, str) and a for a in row["answers"])
        assert row["gold_title"] in titles
        assert row["template"] in TEMPLATES
        assert row["grade"] in GRADES
        assert set(row["signal"]) == {"mentions", "summary_chars"}
        # The gold answer is stated in the gold document ...
        answer = row["answers"][0]
        assert answer.lower() in (row["gold_title"] + " " + text_of[row["gold_title"]]).lower()
        # ... and never in the question.
        assert not leaks(answer, row["question"])
        assert answer.lower() not in row["question"].lower()


def test_no_answer_leaks_into_its_question() -> None:
    for doc in corpus():
        for row in candidates(doc, country_titles(corpus())):
            for answer in row["answers"]:
                words = set(re.findall(r"\w+", row["question"].lower()))
                assert not leaks(answer, row["question"]), row
                assert not {w for w in re.findall(r"\w+", answer.lower()) if len(w) > 3} & words, row


def test_same_seed_same_rows_and_another_seed_samples_differently() -> None:
    docs = corpus()
    first = build_devset(docs, size=5, seed=7)
    assert first == build_devset(list(reversed(docs)), size=5, seed=7)  # input order does not matter
    assert json.dumps(first) == json.dumps(build_devset(docs, size=5, seed=7))
    assert [row["id"] for row in build_devset(docs, size=5, seed=8)] != [row["id"] for row in first] or (
        len(first) <= 1
    )
    assert build_devset(docs, size=0) == []
    assert len(build_devset(docs, size=2)) == 2


def test_write_devset_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "sets" / "dev.jsonl"
    rows = build_devset(corpus(), size=3, seed=0)
    write_devset(out, rows)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    before = out.read_bytes()

    def failing() -> Any:
        yield rows[0]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_devset(out, failing())
    assert out.read_bytes() == before  # the old file, whole
    with pytest.raises(TypeError):
        write_devset(tmp_path / "new.jsonl", [{"id": object()}])
    assert not (tmp_path / "new.jsonl").exists()  # no partial file
    assert sorted(p.name for p in out.parent.iterdir()) == ["dev.jsonl"]  # no temp file left
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _write_corpus(path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(corpus()):
            f.write(json.dumps({"id": str(i), "title": doc.title, "text": doc.text}) + "\n")


def test_read_corpus_reads_index_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    _write_corpus(path)
    assert read_corpus(path) == corpus()
    path.write_text('{"title": 3}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:1"):
        read_corpus(path)


def test_the_devset_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clients.cli import commands, main

    assert commands()["devset"].target == "server.devset_command:register"
    source = tmp_path / "corpus.jsonl"
    _write_corpus(source)
    out = tmp_path / "dev.jsonl"
    argv = ["devset", "build", "--corpus", str(source), "--out", str(out), "--size", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"4 questions written to {out}" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == build_devset(read_corpus(source), size=4, seed=0)
    assert main([*argv, "--size", "0"]) == 2


def test_eval_preset_dev_reads_the_cached_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clients import eval_cli

    monkeypatch.setenv("SSRL_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "devsets" / "dev.jsonl"
    write_devset(path, build_devset(corpus(), size=4, seed=0))

    def no_build(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cached set must be used as it is")

    monkeypatch.setattr(subprocess, "run", no_build)
    assert eval_cli.resolve_data("dev") == path.resolve()
    questions = eval_cli.load_questions(path)
    assert [q["id"] for q in questions] == [json.loads(line)["id"] for line in path.read_text().splitlines()]
    # Other presets and plain paths resolve as before.
    assert eval_cli.resolve_data(str(path)) == path.resolve()
    with pytest.raises(eval_cli.EvalError):
        eval_cli.resolve_data("no_such_set")


def test_eval_preset_dev_builds_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clients import eval_cli

    monkeypatch.setenv("SSRL_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        write_devset(out, build_devset(corpus(), size=2, seed=0))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    path = eval_cli.resolve_data("dev")
    assert path == (tmp_path / "devsets" / "dev.jsonl").resolve()
    assert calls and calls[0][-5:] == [
        "clients.cli",
        "devset",
        "build",
        "--out",
        str(tmp_path / "devsets" / "dev.jsonl"),
    ]

    def failed_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "no network")

    os.unlink(path)
    monkeypatch.setattr(subprocess, "run", failed_run)
    with pytest.raises(eval_cli.EvalError, match="no network"):
        eval_cli.resolve_data("dev")
