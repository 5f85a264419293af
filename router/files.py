"""Directories written whole or not at all: a staging directory beside the target, renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["replace_dir"]


def replace_dir(target: Path, write: Callable[[Path], None], mode: int = 0o755) -> None:
    """Call ``write(staging)`` on an empty directory beside ``target``, then put it in
    ``target``'s place; a reader sees the old directory or the new one, never a half-written
    one. A failing ``write`` leaves ``target`` as it was.

    ``mode``: the staging directory's permissions (mkdtemp makes it private; caches are read
    by servers that may run as another user)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(mode)
    try:
        write(staging)
        # Move the old directory aside first: rename cannot replace a non-empty directory.
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
