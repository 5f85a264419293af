"""The native adapter's training pipeline (train/): the held-out split, the native layout, the
loss masking, and a tiny run of a few steps that proves the pipeline end to end.

The tiny run trains nothing worth keeping (no quality assertion): it checks that the command
reads the data, trains, checkpoints, resumes and writes an adapter with its card.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.search.devset import CorpusDoc
from train.forward import forward_candidates, person_titles
from train.render import query_from_question, render, render_documents, well_formed
from train.split import eval_keys, heldout_questions, leak_reason

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "train" / "data"

DOCS = [
    CorpusDoc(
        "Alpha Spire",
        "Alpha Spire is the tallest tower in the harbour district of Quxville. It was built in 1901.",
    ),
    CorpusDoc(
        "Beta Falls",
        "Beta Falls is the highest waterfall in the northern hills of Quxville. It is much visited.",
    ),
    CorpusDoc(
        "Gamma Lake",
        "Gamma Lake is the largest lake in the eastern plain of Quxville. It was formed in 1850.",
    ),
    CorpusDoc(
        "Delta Bridge",
        "Delta Bridge is the oldest stone bridge over the slow river of Quxville. It was built in 1777.",
    ),
]


# ----- the split ---------------------------------------------------------------------------


def test_heldout_questions_share_no_article_entity_or_question_with_the_eval_sets() -> None:
    eval_rows = [
        {
            "question": "What is the tallest tower in the harbour district of Quxville?",
            "answers": ["Alpha Spire"],
            "gold_title": "Alpha Spire",
        },
        # Beta Falls is an *answer* of an evaluation question about another article.
        {
            "question": "Which waterfall is near the spire?",
            "answers": ["Beta Falls"],
            "title": "Somewhere else",
        },
    ]
    rows, dropped = heldout_questions(DOCS, eval_rows, size=10, seed=0)
    titles = {r["gold_title"] for r in rows}
    assert titles == {"Gamma Lake", "Delta Bridge"}
    assert dropped["article"] == 1 and dropped["entity"] == 1
    keys = eval_keys(eval_rows)
    assert all(leak_reason(r, keys) is None for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_heldout_questions_are_the_same_for_the_same_seed() -> None:
    first, _ = heldout_questions(DOCS, [], size=3, seed=5)
    again, _ = heldout_questions(DOCS, [], size=3, seed=5)
    assert first == again and len(first) == 3


def test_leak_reason_compares_answers_after_normalisation() -> None:
    keys = eval_keys([{"question": "q?", "answers": ["The Nile"], "gold_title": "Egypt"}])
    row = {"question": "Which river?", "answers": ["Nile"], "gold_title": "Nile (river)"}
    assert leak_reason(row, keys) == "entity"


def test_the_committed_questions_do_not_leak_into_the_first_impression_set() -> None:
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line]
    first = [
        json.loads(line)
        for line in (ROOT / "tests/data/first_impression.jsonl").read_text().splitlines()
        if line
    ]
    keys = eval_keys(first)
    assert questions and all(leak_reason(q, keys) is None for q in questions)


# ----- forward questions -----------------------------------------------------------------------

FORWARD_DOCS = [
    CorpusDoc(
        "Quxhall (play)",
        "Quxhall is a tragedy written by the playwright Ada Vell around 1601. It is set in Quxville.",
    ),
    CorpusDoc("Ada Vell", "Ada Vell was a playwright. She wrote many plays; her best known is Quxhall."),
    CorpusDoc("Zorland", "Zorland is a country. Its capital and largest city is Quxville."),
    CorpusDoc("Quxville", "Quxville is a city in Zorland."),
    # "founded by" an article that is no person: no question.
    CorpusDoc("Vell Guild", "The Vell Guild is a society founded by Zorland in 1900."),
    # The sentence speaks of something else than the article: no question.
    CorpusDoc("Ada Vell Prize", "It is awarded yearly. Quxhall was written by Ada Vell, its namesake."),
]


def test_forward_questions_ask_for_a_name_in_the_text_not_the_title() -> None:
    titles = {d.title.split(" (")[0] for d in FORWARD_DOCS}
    persons = person_titles(FORWARD_DOCS)
    assert persons == {"Ada Vell"}
    made = {
        d.title: forward_candidates(d, titles, persons)
        for d in FORWARD_DOCS
        if forward_candidates(d, titles, persons)
    }
    assert set(made) == {"Quxhall (play)", "Zorland"}
    (play,) = made["Quxhall (play)"]
    assert play["question"] == "Who wrote Quxhall?" and play["answers"] == ["Ada Vell", "Vell"]
    assert play["template"] == "creator" and "Ada Vell" in play["sentence"]
    (capital,) = made["Zorland"]
    assert capital["question"] == "What is the capital of Zorland?" and capital["answers"] == ["Quxville"]
    for rows in made.values():
        for row in rows:
            assert row["answers"][0] != row["gold_title"]  # the point: not the title


def test_the_committed_forward_questions_do_not_leak_and_are_trained_on_twice() -> None:
    forward = [json.loads(line) for line in (DATA / "forward.jsonl").read_text().splitlines() if line]
    evaluation = [
        json.loads(line)
        for line in (ROOT / "tests/data/first_impression.jsonl").read_text().splitlines()
        if line
    ]
    keys = eval_keys(evaluation)
    assert forward and all(leak_reason(q, keys) is None for q in forward)
    rows = [json.loads(line) for line in (DATA / "trajectories.jsonl").read_text().splitlines() if line]
    sources = {}
    for row in rows:
        if row["source"].startswith("forward-"):
            sources.setdefault(row["id"], set()).add(row["source"])
    assert len(sources) == len(forward)
    assert all(kinds == {"forward-inserted", "forward-self"} for kinds in sources.values())


# ----- the native layout and its masks --------------------------------------------------------


def test_render_self_written_information_is_learned() -> None:
    t = render(
        "Mona Lisa painter", "Doc 1(Title: Mona Lisa) A portrait by Leonardo.", "Leonardo", inserted=False
    )
    assert t.text == (
        "<search> Mona Lisa painter </search>\n\n<information>Doc 1(Title: Mona Lisa) A portrait by "
        "Leonardo.</information>\n\n<answer> Leonardo </answer>"
    )
    assert t.masked == ()
    assert well_formed(t.text)


def test_render_inserted_documents_are_masked_with_the_close_the_server_writes() -> None:
    docs = render_documents([("Mona Lisa", "A portrait by Leonardo da Vinci.")], 150)
    t = render("Mona Lisa painter", docs, "Leonardo da Vinci", inserted=True)
    ((start, end),) = t.masked
    assert t.text[start:end] == docs + "</information>\n\n"
    assert t.text[:start].endswith("<information>") and t.text[end:].startswith("<answer>")
    assert well_formed(t.text)


@pytest.mark.parametrize(
    "text",
    [
        "<search> a\nb </search>\n\n<information>x</information>\n\n<answer> y </answer>",  # two-line query
        "<search> a </search>\n\n<information>x\n\n<answer> y </answer>",  # unclosed block
        "<search> a </search>\n\n<information>x</information>\n\n<answer>  </answer>",  # empty answer
        "<answer> y </answer><search> a </search><information>x</information>",  # out of order
    ],
)
def test_well_formed_refuses_broken_trajectories(text: str) -> None:
    assert not well_formed(text)


def test_query_from_question_drops_the_lead_and_the_question_mark() -> None:
    assert query_from_question("What is the capital city of Hyōgo Prefecture, Japan?") == (
        "capital city of Hyōgo Prefecture, Japan"
    )
    assert query_from_question("Who was the eponymous founder of the Ottoman Empire?") == (
        "eponymous founder of the Ottoman Empire"
    )
    assert len(query_from_question("Which " + "very " * 30 + "long thing?").split()) == 10


class _CharTokenizer:
    """One token per character, with offsets: masks are checked exactly."""

    eos_token = "|"

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        return "".join(f"[{m['role']}:{m['content']}]" for m in messages) + "[assistant:"

    def __call__(self, text: str, return_offsets_mapping: bool, add_special_tokens: bool) -> dict[str, list]:
        return {"input_ids": [ord(c) for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_encode_masks_the_prompt_and_the_inserted_spans_only() -> None:
    from train.sft import IGNORE, encode

    docs = "Doc 1(Title: T) inserted text"
    t = render("q", docs, "a", inserted=True)
    example = encode(_CharTokenizer(), "Why?", t.text, t.masked, max_len=10_000)
    learned = "".join(
        chr(i) for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    )
    assert learned == "<search> q </search>\n\n<information><answer> a </answer>|"


def test_encode_learns_self_written_information() -> None:
    from train.sft import IGNORE, encode

    t = render("q", "my own words", "a", inserted=False)
    example = encode(_CharTokenizer(), "Why?", t.text, t.masked, max_len=10_000)
    learned = "".join(
        chr(i) for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    )
    assert "my own words" in learned and learned.endswith("</answer>|")


# ----- the committed data ---------------------------------------------------------------------


def test_committed_trajectories_are_well_formed_and_masked_where_inserted() -> None:
    rows = [json.loads(line) for line in (DATA / "trajectories.jsonl").read_text().splitlines() if line]
    assert len(rows) >= 500
    for row in rows:
        assert well_formed(row["text"]), row["id"]
        inserted = row["source"].endswith("inserted")
        assert bool(row["masked"]) == inserted, row["id"]
        for start, end in row["masked"]:
            assert row["text"][start:end].startswith("Doc 1(Title:")


# ----- a tiny run: the pipeline end to end ----------------------------------------------------


def _checkpoint() -> Path | None:
    from router.engine.default_model import checkpoint_is_valid, default_cache_dir

    path = default_cache_dir() / "models" / "smollm2-135m-instruct"
    return path if checkpoint_is_valid(path) else None


@pytest.mark.skipif(
    _checkpoint() is None, reason="the embedded checkpoint is not prepared (ssrl model prepare)"
)
def test_a_tiny_training_run_trains_checkpoints_resumes_and_writes_the_adapter(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    out, work = tmp_path / "adapter", tmp_path / "work"
    base = [sys.executable, "-m", "train.sft", "--out", str(out), "--work-dir", str(work), "--limit", "4"]
    args = ["--batch-size", "2", "--max-len", "96", "--save-every", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(
        [*base, *args, "--max-steps", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-2000:]
    state = json.loads((work / "latest" / "state.json").read_text())
    assert state["step"] == 1
    again = subprocess.run(
        [*base, *args, "--max-steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at step 1" in again.stderr
    assert (out / "adapter_model.safetensors").stat().st_size > 1_000_000
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and set(config["target_modules"]) >= {"q_proj", "down_proj"}
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert "Steps: 2" in (out / "README.md").read_text()


def test_forward_questions_for_cities_and_elements() -> None:
    from train.forward import city_titles

    docs = [
        CorpusDoc("Quxville", "Quxville is the capital city of Zorland."),
        CorpusDoc("Zorland", "Zorland is a country in the north."),
        CorpusDoc("Vell Tower", "The Vell Tower is a stone tower in Quxville, Zorland. It is old."),
        CorpusDoc(
            "Zorium", "Zorium is a chemical element; it has symbol Zo and atomic number 200. It glows."
        ),
    ]
    titles = {d.title for d in docs}
    cities = city_titles(docs)
    assert cities == {"Quxville"}
    (tower,) = forward_candidates(docs[2], titles, set(), cities, {"Zorland"})
    assert tower["question"] == "In which city is the Vell Tower?" and tower["answers"] == ["Quxville"]
    # Without Zorland known as a country, "in Quxville, Zorland" is no city and country.
    assert forward_candidates(docs[2], titles, set(), cities, set()) == []
    element = forward_candidates(docs[3], titles, set(), cities, {"Zorland"})
    assert [(e["question"], e["answers"]) for e in element] == [
        ("What is the chemical symbol for zorium?", ["Zo"]),
        ("What is the atomic number of zorium?", ["200"]),
    ]
