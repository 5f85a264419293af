"""Local FTS5 index: building, ranking, hostile queries, atomic rebuilds, corpus conversion."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from router.search.base import Document, SearchBackend, SearchError
from router.search.default_corpus import wiki_summaries_to_jsonl, wiki_url
from router.search.local_index import (
    INDEX_FILENAME,
    IndexInfo,
    LocalIndexBackend,
    build_index,
    fts_query,
    read_index_info,
)

DOCS: list[dict[str, Any]] = [
    {
        "id": "hamlet",
        "title": "Hamlet",
        "text": "Hamlet is a tragedy written by William Shakespeare about a Danish prince.",
        "url": "https://en.wikipedia.org/wiki/Hamlet",
    },
    {
        "id": "eiffel",
        "title": "Eiffel Tower",
        "text": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    },
    {
        "id": "everest",
        "title": "Mount Everest",
        "text": "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
    },
    {
        "title": "Photosynthesis",
        "text": "Photosynthesis is how plants convert light energy into chemical energy.",
    },
]
# Filler documents that mention "tower" once in passing, so ranking has something to beat.
FILLER = [
    {"id": f"f{i}", "title": f"Town {i}", "text": f"Town {i} has a water tower and a market."}
    for i in range(20)
]

HOSTILE_QUERIES = [
    "",
    '"',
    '""""',
    "*",
    "tower*",
    "AND",
    "Eiffel AND",
    "OR NOT AND",
    "NEAR(",
    "NEAR(eiffel tower, 2)",
    "-",
    "-tower",
    ":",
    "title:eiffel",
    "(",
    ")",
    "((eiffel)",
    "^tower",
    "+{}[]",
    "?!.,;'`~@#$%&=|\\/<>",
    "___",
    "  \t\n ",
    "eiffel\x00tower",
    "\uff25\uff29\uff26\uff26\uff25\uff2c",  # fullwidth "EIFFEL"
    "Эйфелева башня",
    "埃菲尔铁塔",
    "🗼🗼",
    "x " * 500,
]


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture()
def index_dir(tmp_path: Path) -> Path:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS + FILLER)
    out = tmp_path / "index"
    build_index(src, out, source="unit test", progress=False)
    return out


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != INDEX_FILENAME)


def test_build_reports_info(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS + FILLER)
    info = build_index(src, tmp_path / "index", source="unit test", progress=False)
    assert isinstance(info, IndexInfo)
    assert info.documents == len(DOCS) + len(FILLER)
    assert info.path == tmp_path / "index" / INDEX_FILENAME
    assert info.source == "unit test"
    assert read_index_info(tmp_path / "index") == info
    assert leftovers(tmp_path / "index") == []


def test_blank_lines_skipped_and_missing_id_is_line_number(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "\n" + json.dumps({"title": "Alpha", "text": "zebra crossing"}) + "\n\n  \n",
        encoding="utf-8",
    )
    info = build_index(src, tmp_path / "index", progress=False)
    assert info.documents == 1
    (doc,) = LocalIndexBackend(tmp_path / "index").search_sync("zebra", 5)
    assert doc.id == "2"


def test_relevant_document_ranks_first(index_dir: Path) -> None:
    backend = LocalIndexBackend(index_dir, name="wiki")
    docs = backend.search_sync("Who wrote the tragedy Hamlet?", 3)
    assert docs[0] == Document(
        title="Hamlet",
        text=DOCS[0]["text"],
        url="https://en.wikipedia.org/wiki/Hamlet",
        score=docs[0].score,
        source="wiki",
        id="hamlet",
    )
    assert docs[0].score is not None and docs[0].score > 0
    tower = backend.search_sync("Where is the Eiffel tower?", 5)
    assert tower[0].id == "eiffel"
    assert tower[0].url is None  # no url in the JSONL -> None, not ""
    # Stemming: "plant" and "converts" match "plants" and "convert".
    assert backend.search_sync("a plant converts light", 1)[0].title == "Photosynthesis"


def test_k_is_respected_and_scores_descend(index_dir: Path) -> None:
    backend = LocalIndexBackend(index_dir)
    for k in (1, 3, 10):
        docs = backend.search_sync("tower", k)
        assert len(docs) == k
        scores = [d.score for d in docs]
        assert all(s is not None for s in scores)
        assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert len(backend.search_sync("tower", 1000)) == 21  # every doc mentioning a tower
    assert len(backend.search_sync("tower", 10**30)) == 21  # capped, not an overflow
    assert backend.search_sync("tower", 0) == []
    assert backend.search_sync("tower", -1) == []


def test_no_match_is_empty(index_dir: Path) -> None:
    assert LocalIndexBackend(index_dir).search_sync("xylophone quasar", 5) == []


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_queries_never_raise(index_dir: Path, query: str) -> None:
    docs = LocalIndexBackend(index_dir).search_sync(query, 5)
    assert isinstance(docs, list) and len(docs) <= 5


def test_operators_are_searched_as_words(index_dir: Path) -> None:
    backend = LocalIndexBackend(index_dir)
    assert backend.search_sync("NEAR(eiffel tower)", 1)[0].id == "eiffel"
    assert backend.search_sync("-everest*", 1)[0].id == "everest"
    assert backend.search_sync("title:hamlet", 1)[0].id == "hamlet"


def test_fts_query_shape() -> None:
    assert fts_query("") == ""
    assert fts_query('"*:()-') == ""
    assert fts_query("Who wrote Hamlet? hamlet") == '"wrote" OR "hamlet"'
    assert fts_query("NEAR(a AND b)") == '"near" OR "b"'
    # Only stop words: keep them rather than search for nothing.
    assert fts_query("The Who") == '"the" OR "who"'
    assert fts_query(" ".join(f"w{i}" for i in range(100))).count(" OR ") == 31


def test_async_search_and_protocol(index_dir: Path) -> None:
    backend = LocalIndexBackend(index_dir)
    assert isinstance(backend, SearchBackend)

    async def scenario() -> list[list[Document]]:
        results = await asyncio.gather(
            *(backend.search(q, 2) for q in ["hamlet", "eiffel", "everest", ""] * 5)
        )
        await backend.aclose()
        return list(results)

    results = asyncio.run(scenario())
    assert [r[0].id for r in results[:3]] == ["hamlet", "eiffel", "everest"]
    assert results[3] == []
    with pytest.raises(SearchError):
        backend.search_sync("hamlet", 1)


def test_malformed_line_names_line_number(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps(DOCS[0]) + "\n\n" + '{"title": "broken", "text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.jsonl:3"):
        build_index(src, tmp_path / "index", progress=False)
    assert leftovers(tmp_path / "index") == []


@pytest.mark.parametrize(
    "line",
    [
        "[1, 2]",
        '{"title": "no text"}',
        '{"title": 3, "text": "x"}',
        '{"title": "t", "text": "x", "url": 5}',
        '{"id": [1], "title": "t", "text": "x"}',
    ],
)
def test_invalid_record_names_line_number(tmp_path: Path, line: str) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps(DOCS[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.jsonl:2"):
        build_index(src, tmp_path / "index", progress=False)


def test_missing_index_raises_search_error(tmp_path: Path) -> None:
    backend = LocalIndexBackend(tmp_path / "nowhere")
    with pytest.raises(SearchError, match=r"index not found at .*ssrl index build"):
        backend.search_sync("hamlet", 3)
    with pytest.raises(SearchError, match="index not found"):
        asyncio.run(backend.search("hamlet", 3))
    with pytest.raises(SearchError):
        read_index_info(tmp_path / "nowhere")
    # A query with no words never touches the index, so it is simply empty.
    assert backend.search_sync("?!", 3) == []


def test_corrupt_index_raises_search_error(tmp_path: Path) -> None:
    (tmp_path / INDEX_FILENAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(SearchError, match="corrupt"):
        LocalIndexBackend(tmp_path).search_sync("hamlet", 3)


def test_foreign_sqlite_file_raises_search_error(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / INDEX_FILENAME)
    conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('format_version', '999')")
    conn.commit()
    conn.close()
    with pytest.raises(SearchError, match="format"):
        LocalIndexBackend(tmp_path).search_sync("hamlet", 3)


def test_failed_rebuild_keeps_previous_index(index_dir: Path, tmp_path: Path) -> None:
    before = read_index_info(index_dir)
    backend = LocalIndexBackend(index_dir)
    assert backend.search_sync("hamlet", 1)[0].id == "hamlet"  # holds a pooled connection
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps({"title": f"New {i}", "text": "nebula"}) + "\n" for i in range(50))
        + "{not json\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:51"):
        build_index(bad, index_dir, progress=False)
    assert leftovers(index_dir) == []
    assert read_index_info(index_dir) == before
    assert backend.search_sync("hamlet", 1)[0].id == "hamlet"
    assert LocalIndexBackend(index_dir).search_sync("nebula", 5) == []


def test_rebuild_is_picked_up_by_open_backend(index_dir: Path, tmp_path: Path) -> None:
    backend = LocalIndexBackend(index_dir)
    assert backend.search_sync("hamlet", 1)[0].id == "hamlet"
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "n", "title": "Nebula", "text": "gas"}])
    info = build_index(new, index_dir, progress=False)
    assert info.documents == 1
    assert backend.search_sync("hamlet", 1) == []
    assert backend.search_sync("nebula", 1)[0].id == "n"
    assert leftovers(index_dir) == []


def test_wiki_summaries_to_jsonl(tmp_path: Path) -> None:
    summaries = {
        "Albert Einstein": {
            "title": "Albert Einstein",
            "description": "German-born physicist",
            "extract": "Albert Einstein was a German-born theoretical physicist.",
            "topic": "People",
        },
        "HIV/AIDS": {
            "title": "HIV/AIDS",
            "description": "Spectrum of conditions",
            "extract": "HIV/AIDS is a spectrum of conditions caused by HIV.",
            "topic": "Biology",
        },
        "Café (Paris)": {"title": "Café (Paris)", "extract": "A café in Paris.", "topic": ""},
        "Empty": {"title": "Empty", "description": "nothing", "extract": "  ", "topic": "X"},
    }
    src = tmp_path / "summaries.json"
    src.write_text(json.dumps(summaries), encoding="utf-8")
    out = tmp_path / "corpus" / "wiki.jsonl"
    assert wiki_summaries_to_jsonl(src, out) == 3
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {
        "id": "Albert Einstein",
        "title": "Albert Einstein",
        "text": "Albert Einstein was a German-born theoretical physicist.",
        "url": "https://en.wikipedia.org/wiki/Albert_Einstein",
    }
    assert rows[1]["url"] == "https://en.wikipedia.org/wiki/HIV/AIDS"
    assert rows[2]["url"] == "https://en.wikipedia.org/wiki/Caf%C3%A9_(Paris)"
    assert [p.name for p in out.parent.iterdir()] == ["wiki.jsonl"]  # no temp files left

    info = build_index(out, tmp_path / "index", progress=False)
    assert info.documents == 3
    hit = LocalIndexBackend(tmp_path / "index").search_sync("cafe paris", 1)[0]
    assert hit.title == "Café (Paris)" and hit.url == wiki_url("Café (Paris)")
