"""The layer contracts, read from the source's import statements (no module is imported).

- `router/` (the self-search brain) imports nothing from `server/` or `clients/`.
- The typed client (`clients/client.py`, `clients/models.py`) imports only the standard
  library, httpx and pydantic: it must work where only the base install is present.
- The client side of the command line (every module of `clients/`) never imports `server/`,
  the server's dependencies or the engine, lazily or not; from `router/` only its pure
  modules (`ROUTER_PURE`: scoring, calibration, entropy and what they import), which import
  nothing but the standard library and each other. Optional packages (rich, tqdm,
  matplotlib: the `client-extras` extra) are imported only inside functions, where a
  missing one degrades the output instead of failing the import.
- The `ssrl` dispatcher (`clients/cli.py`) imports only the standard library: it must load
  where either side is missing. The server's commands (`server/commands.py`) import only
  the standard library at module level.

`make lint` runs this file, so a violation fails CI before any test runs.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}
# What the base install (`pip install ssrl`, no extra) provides besides the standard library.
BASE_DEPENDENCIES = frozenset({"httpx", "pydantic"})
# The server's dependencies and the engine: never imported by the client side.
SERVER_SIDE = frozenset(
    {
        "server",
        "fastapi",
        "starlette",
        "uvicorn",
        "pydantic_settings",
        "prometheus_client",
        "tenacity",
        "cachetools",
        "vllm",
        "torch",
        "transformers",
        "gguf",
        "accelerate",
    }
)
# router/'s pure logic the client commands (`ssrl eval`, `ssrl calibrate`) may use.
ROUTER_PURE = frozenset(
    {"router.scoring", "router.calibration", "router.entropy", "router.tags", "router.engine.base"}
)
CLIENT_OPTIONAL = frozenset({"rich", "tqdm", "matplotlib"})
CLIENT_MODULES = sorted((REPO / "clients").glob("*.py"))


def _module_file(module: str) -> Path:
    path = REPO.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


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


def module_level_imports(source: str, filename: str = "<source>") -> Iterator[tuple[int, str]]:
    """(line, module) for the imports that run when the module is imported: those outside
    functions and classes, and not under `if TYPE_CHECKING:`."""

    def walk(nodes: list[ast.stmt]) -> Iterator[tuple[int, str]]:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield node.lineno, alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield node.lineno, node.module
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    yield from walk(block)

    yield from walk(ast.parse(source, filename).body)


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


def _only(files: list[Path], allowed: frozenset[str], *, module_level: bool) -> list[str]:
    """Imports in `files` outside `allowed` (top-level names, or full dotted module names)."""
    read = module_level_imports if module_level else imported_modules
    found = []
    for path in files:
        for line, module in read(path.read_text(), str(path)):
            if module.split(".")[0] not in allowed and module not in allowed:
                found.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return found


def test_the_typed_client_needs_only_the_base_install() -> None:
    files = [REPO / "clients" / "client.py", REPO / "clients" / "models.py"]
    allowed = STDLIB | BASE_DEPENDENCIES | {"clients.models"}
    assert _only(files, allowed, module_level=False) == []


def test_the_client_commands_never_import_the_server_side() -> None:
    assert CLIENT_MODULES
    assert violations(CLIENT_MODULES, SERVER_SIDE) == []
    routers = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in CLIENT_MODULES
        for line, module in imported_modules(path.read_text(), str(path))
        if module.split(".")[0] == "router" and module not in ROUTER_PURE
    ]
    assert routers == [], "the client side may use only router's pure modules"


def test_the_client_commands_import_optional_packages_lazily() -> None:
    clients = {f"clients.{p.stem}" for p in CLIENT_MODULES}
    allowed = STDLIB | BASE_DEPENDENCIES | clients | ROUTER_PURE
    assert _only(CLIENT_MODULES, allowed, module_level=True) == []
    # Anything else they import (inside functions) is an optional extra.
    lazy = _only(CLIENT_MODULES, allowed | CLIENT_OPTIONAL, module_level=False)
    assert lazy == []


def test_routers_pure_modules_import_only_the_standard_library_and_each_other() -> None:
    for module in sorted(ROUTER_PURE):
        path = _module_file(module)
        assert path.is_file(), module
        assert _only([path], STDLIB | ROUTER_PURE, module_level=False) == [], module


def test_the_dispatcher_and_the_server_commands_load_without_either_side() -> None:
    assert _only([REPO / "clients" / "cli.py"], STDLIB, module_level=False) == []
    assert _only([REPO / "server" / "commands.py"], STDLIB, module_level=True) == []


def test_the_checker_sees_lazy_and_dotted_imports() -> None:
    source = "import os\ndef f():\n    from server.app import create_app\n    import vllm.engine\n"
    assert [m for _, m in imported_modules(source)] == ["os", "server.app", "vllm.engine"]


def test_module_level_imports_skip_functions_and_type_checking() -> None:
    source = (
        "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fastapi\n"
        "try:\n    import rich\nexcept ImportError:\n    pass\ndef f():\n    import tqdm\n"
    )
    assert [m for _, m in module_level_imports(source)] == ["os", "typing", "rich"]


def test_relative_imports_stay_inside_the_package() -> None:
    # `from . import x` has no module name of another layer; it is not a violation.
    assert list(imported_modules("from . import tags\nfrom .tags import x\n")) == []


def _server_import_cycles() -> list[list[str]]:
    """Circles among server/'s modules (lazy imports count: a circle held together by a
    function-level import is still one module needing the other back)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "server").glob("*.py")):
        name = f"server.{path.stem}"
        targets = {
            ".".join(module.split(".")[:2])
            for _, module in imported_modules(path.read_text(), str(path))
            if module.startswith("server.")
        }
        graph[name] = targets - {name}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_server_modules_import_one_another_without_a_circle() -> None:
    assert _server_import_cycles() == []
