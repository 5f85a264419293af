"""An offline BM25 search backend: one SQLite FTS5 file, built atomically, queried read-only.

Layout of ``<index_dir>/index.sqlite``:

* ``docs``: an FTS5 table ``(id UNINDEXED, title, text, url UNINDEXED)``; it stores the
  documents themselves, so a hit needs no second lookup.
* ``meta``: ``key -> value`` text rows: ``format_version``, ``documents``, ``built_at``
  (ISO 8601, UTC) and ``source``.

The file is only ever written under a temporary name and then renamed over ``index.sqlite``,
so readers see either the old index or the new one, never a half-built one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from router.search.base import Document, SearchError

INDEX_FILENAME = "index.sqlite"
# Bump when the schema or tokenizer changes: an index of another version is refused, not misread.
FORMAT_VERSION = 1

# Porter stemming lets "invented" in a question match "invention" in a passage; diacritics are
# folded so "Dvorak" finds "Dvořák".
_TOKENIZER = "porter unicode61 remove_diacritics 2"
# bm25() takes one weight per column (id, title, text, url). A query term in the short title
# column is strong evidence that the page is about it, so the title counts double.
_BM25_WEIGHTS = "0.0, 2.0, 1.0, 0.0"
_BATCH_SIZE = 5_000
# A model may send a whole paragraph as its query; every extra OR term costs a posting-list scan.
_MAX_QUERY_TERMS = 32
# k comes from a model's tool call: bound it so one call cannot pull the whole corpus into
# memory (and so a huge int cannot overflow SQLite's 64-bit LIMIT).
_MAX_K = 1_000

# Letters and digits only: "_" is in \w but unicode61 treats it as a separator, and a quoted
# phrase that tokenizes to nothing would silently match nothing.
_TOKEN_RE = re.compile(r"[^\W_]+")

# English function words. In an OR query they match nearly every row, and FTS5 has to score
# every matching row before it can sort, so keeping them costs far more than their tiny IDF
# adds to the ranking. Dropped only when something else is left ("The Who" stays searchable).
_STOPWORDS = frozenset(
    """
        a about above after again against all am an and any are as at be because been before being below
        between both but by can could did do does doing down during each few for from further had has
        have having he her here hers herself him himself his how i if in into is it its itself just me
        more most my myself no nor not now of off on once only or other our ours ourselves out over own
        same she should so some such than that the their theirs them themselves then there these they
        this those through to too under until up very was we were what when where which while who whom
        why will with would you your yours yourself yourselves s t d ll m re ve
    """.split()
)


@dataclass(frozen=True, slots=True)
class IndexInfo:
    """What an index holds and where it came from."""

    path: Path
    documents: int
    built_at: datetime
    source: str


def index_path(index_dir: Path) -> Path:
    """The SQLite file of the index kept in ``index_dir``."""
    return Path(index_dir) / INDEX_FILENAME


def fts_query(text: str) -> str:
    """Turn arbitrary text into a safe FTS5 MATCH expression, or "" when it has no words.

    Each word is quoted, so FTS5 operators (AND, NEAR, ``*``, ``-``, ``:``, parentheses) in a
    model's query are searched as plain words, never parsed as syntax; the words are OR-ed so
    a question still matches passages that contain only some of them.
    """
    seen: dict[str, None] = {}
    for token in _TOKEN_RE.findall(text.lower()):
        seen.setdefault(token, None)
    tokens = [t for t in seen if t not in _STOPWORDS] or list(seen)
    # _TOKEN_RE never yields a double quote, so wrapping in quotes needs no escaping.
    return " OR ".join(f'"{t}"' for t in tokens[:_MAX_QUERY_TERMS])


# --------------------------------------------------------------------------------------------
# Building


def _iter_jsonl(input_path: Path, bar: tqdm[Any]) -> Iterator[tuple[str, str, str, str | None]]:
    """Yield ``(id, title, text, url)`` rows; raise ValueError naming the line of a bad one."""
    with open(input_path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            where = f"{input_path}:{lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{where}: malformed JSON line: {exc}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            title, text, url = obj.get("title"), obj.get("text"), obj.get("url")
            doc_id = obj.get("id", lineno)
            if not isinstance(title, str) or not isinstance(text, str):
                raise ValueError(f'{where}: "title" and "text" must be strings')
            if url is not None and not isinstance(url, str):
                raise ValueError(f'{where}: "url" must be a string or null')
            if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                raise ValueError(f'{where}: "id" must be a string or an integer')
            yield str(doc_id), title, text, url


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_index(input_path: Path, out_dir: Path, *, source: str = "", progress: bool = True) -> IndexInfo:
    """Build ``out_dir/index.sqlite`` from a JSONL file of ``{"id"?, "title", "text", "url"?}``.

    A missing id becomes the line number; blank lines are skipped. The build goes into a temp
    file in ``out_dir`` (same filesystem, so the final rename is atomic); on any failure the
    temp file is removed and a previous index stays as it was.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = index_path(out_dir)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{INDEX_FILENAME}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    built_at = datetime.now(UTC).replace(microsecond=0)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            # No journal and no syncs: the temp file is thrown away if anything goes wrong, and
            # durability comes from the fsync + rename below.
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("PRAGMA cache_size = -262144")  # 256 MiB of page cache for the merge
            conn.execute(
                "CREATE VIRTUAL TABLE docs USING fts5("
                f"id UNINDEXED, title, text, url UNINDEXED, tokenize = '{_TOKENIZER}')"
            )
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            documents = 0
            with tqdm(
                total=input_path.stat().st_size or None,
                unit="B",
                unit_scale=True,
                desc=f"indexing {input_path.name}",
                disable=not progress,
            ) as bar:
                rows = _iter_jsonl(input_path, bar)
                conn.execute("BEGIN")
                while batch := list(itertools.islice(rows, _BATCH_SIZE)):
                    conn.executemany("INSERT INTO docs VALUES (?, ?, ?, ?)", batch)
                    documents += len(batch)
                    bar.set_postfix(docs=f"{documents:,}", refresh=False)
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [
                        ("format_version", str(FORMAT_VERSION)),
                        ("documents", str(documents)),
                        ("built_at", built_at.isoformat()),
                        ("source", source),
                    ],
                )
                conn.execute("COMMIT")
            # Merge all segments into one b-tree: fewer segments to probe on every query.
            conn.execute("INSERT INTO docs(docs) VALUES ('optimize')")
        finally:
            conn.close()
        # mkstemp makes the file private (0600); an index is meant to be read by the server.
        tmp.chmod(0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out_dir)
    return IndexInfo(path=final, documents=documents, built_at=built_at, source=source)


# --------------------------------------------------------------------------------------------
# Reading


def _open_readonly(path: Path) -> tuple[sqlite3.Connection, dict[str, str]]:
    """Open an index read-only, check its format, return it with its metadata.

    SearchError when the file is missing, is not an index, or is of another format version.
    """
    if not path.is_file():
        raise SearchError(f"index not found at {path}; run `ssrl index build`")
    try:
        # check_same_thread=False: a pooled connection moves between to_thread workers, but
        # the pool hands it to one thread at a time.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise SearchError(f"cannot open index at {path}: {exc}") from exc
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        conn.close()
        raise SearchError(f"index at {path} is corrupt or not an index: {exc}") from exc
    if meta.get("format_version") != str(FORMAT_VERSION):
        conn.close()
        raise SearchError(
            f"index at {path} has format {meta.get('format_version')!r}, expected "
            f"{FORMAT_VERSION}; rebuild it with `ssrl index build`"
        )
    return conn, meta


def read_index_info(index_dir: Path) -> IndexInfo:
    """Read an index's metadata; SearchError when it is missing, corrupt or of another format."""
    path = index_path(index_dir)
    conn, meta = _open_readonly(path)
    conn.close()
    return IndexInfo(
        path=path,
        documents=int(meta["documents"]),
        built_at=datetime.fromisoformat(meta["built_at"]),
        source=meta["source"],
    )


_SEARCH_SQL = f"""
    SELECT id, title, text, url, bm25(docs, {_BM25_WEIGHTS}) AS r
    FROM docs WHERE docs MATCH ? ORDER BY r LIMIT ?
"""


class LocalIndexBackend:
    """``SearchBackend`` over a local FTS5 index, best BM25 match first.

    Connections are pooled rather than shared behind one lock, so concurrent searches run in
    parallel (sqlite3 releases the GIL while a statement runs). A rebuilt index (a new file
    renamed over the old one) is picked up by the next search without a restart.
    """

    def __init__(self, index_dir: Path, name: str = "local") -> None:
        self.name = name
        self.index_dir = Path(index_dir)
        self._path = index_path(self.index_dir)
        self._lock = threading.Lock()
        # Idle connections, each with the (inode, mtime) of the file it was opened on.
        self._idle: list[tuple[sqlite3.Connection, tuple[int, int]]] = []
        self._closed = False

    def _file_id(self) -> tuple[int, int]:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            raise SearchError(f"index not found at {self._path}; run `ssrl index build`") from None
        return st.st_ino, st.st_mtime_ns

    def _acquire(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        file_id = self._file_id()
        conn: sqlite3.Connection | None = None
        stale: list[sqlite3.Connection] = []
        with self._lock:
            if self._closed:
                raise SearchError(f"search backend {self.name!r} is closed")
            while self._idle:
                candidate, candidate_file = self._idle.pop()
                if candidate_file == file_id:
                    conn = candidate
                    break
                stale.append(candidate)  # opened on an index that has since been replaced
        for old in stale:
            old.close()
        if conn is None:
            conn, _ = _open_readonly(self._path)
        return conn, file_id

    def _release(self, conn: sqlite3.Connection, file_id: tuple[int, int]) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append((conn, file_id))
                return
        conn.close()

    def search_sync(self, query: str, k: int) -> list[Document]:
        """Blocking search: at most ``k`` (<= 1000) documents, best first, ``score = -bm25``."""
        expression = fts_query(query)
        if not expression or k <= 0:
            return []
        conn, file_id = self._acquire()
        try:
            rows = conn.execute(_SEARCH_SQL, (expression, min(k, _MAX_K))).fetchall()
        except sqlite3.Error as exc:
            # The connection may be what is broken; do not hand it to the next search.
            conn.close()
            raise SearchError(f"local index search failed ({self._path}): {exc}") from exc
        self._release(conn, file_id)
        return [
            Document(
                title=title,
                text=text,
                url=url or None,
                score=-rank,
                source=self.name,
                id=doc_id,
            )
            for doc_id, title, text, url, rank in rows
        ]

    async def search(self, query: str, k: int) -> list[Document]:
        # SQLite calls block; keep them off the event loop.
        return await asyncio.to_thread(self.search_sync, query, k)

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
