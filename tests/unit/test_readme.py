"""The README documents what the code does: every serve flag, and the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from scripts.readme_flags import README, render

ROOT = Path(__file__).resolve().parents[2]


def test_flags_table_is_current():
    assert render(README.read_text()) == README.read_text(), (
        "README's flags table is stale: run .venv/bin/python scripts/readme_flags.py"
    )


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    assert re.search(r"^make test\b", readme, flags=re.M)
    assert re.search(r"^make serve\b", readme, flags=re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
