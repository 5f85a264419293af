"""Regenerate the `ssrl serve` flags table in README.md from the settings model.

.venv/bin/python scripts/readme_flags.py          # rewrite README.md in place
.venv/bin/python scripts/readme_flags.py --check  # exit 1 when the README is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

from server.settings import ServeSettings

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- flags:start -->", "<!-- flags:end -->"


def _default(name: str) -> str:
    field = ServeSettings.model_fields[name]
    if field.default_factory is not None:
        return "~/.cache/ssrl" if name == "cache_dir" else "[]"
    return str(field.default)


def flags_table() -> str:
    rows = ["| flag | environment | default | what it does |", "|---|---|---|---|"]
    for name, field in ServeSettings.model_fields.items():
        rows.append(
            f"| `--{name.replace('_', '-')}` | `SSRL_{name.upper()}` | `{_default(name)}` "
            f"| {field.description} |"
        )
    return "\n".join(rows)


def render(readme: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{flags_table()}\n{END}{tail}"


def main() -> int:
    current = README.read_text()
    updated = render(current)
    if "--check" in sys.argv:
        return 0 if updated == current else 1
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
