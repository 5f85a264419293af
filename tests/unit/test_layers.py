"""The layer contracts, read from the source's import statements (no module is imported).

- `router/` (the self-search brain) imports nothing from `server/` or `clients/`.
- The typed client (`clients/client.py`, `clients/models.py`) imports nothing from `server/`,
  `router/`, or the server's heavy dependencies: it must work where only httpx and pydantic
  are installed.

`make lint` runs this file, so a violation fails CI before any test runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# (what the rule covers, the top-level modules it must not import)
CONTRACTS: dict[str, tuple[list[Path], frozenset[str]]] = {
    "router is the bottom layer": (
        sorted((REPO / "router").rglob("*.py")),
        frozenset({"server", "clients"}),
    ),
    "the typed client stands alone": (
        [REPO / "clients" / "client.py", REPO / "clients" / "models.py"],
        frozenset({"server", "router", "fastapi", "starlette", "uvicorn", "vllm", "torch", "transformers"}),
    ),
}


def imported_modules(source: str, filename: str = "<source>") -> Iterator[tuple[int, str]]:
    """(line, module) for every absolute import in `source`, lazy imports inside functions too."""
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def violations(files: list[Path], forbidden: frozenset[str]) -> list[str]:
    found = []
    for path in files:
        for line, module in imported_modules(path.read_text(), str(path)):
            if module.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_layer_contract_holds(contract: str) -> None:
    files, forbidden = CONTRACTS[contract]
    assert files, f"{contract}: no files found (was the layout changed?)"
    assert violations(files, forbidden) == [], contract


def test_the_checker_sees_lazy_and_dotted_imports() -> None:
    source = "import os\ndef f():\n    from server.app import create_app\n    import vllm.engine\n"
    assert [m for _, m in imported_modules(source)] == ["os", "server.app", "vllm.engine"]


def test_relative_imports_stay_inside_the_package() -> None:
    # `from . import x` has no module name of another layer; it is not a violation.
    assert list(imported_modules("from . import tags\nfrom .tags import x\n")) == []
