"""The `ssrl` entry point: one command line over two sides that install separately.

    ssrl serve | model prepare | index build     # the server's commands (server/commands.py)
    ssrl devset build                            # the offline dev QA set (server/devset_command.py)
    ssrl chat | eval | calibrate                 # the client's commands (clients/)

This module is a dispatcher and imports neither side. It reads the command name from the
arguments, imports only the module that registers that command, and runs it, so `ssrl chat`
works where only the base install (the client: httpx, pydantic) is present, and `ssrl serve`
without the server's dependencies says which extra to install instead of a traceback.

A command is a function `register(subparsers)` that adds one top-level parser with
`set_defaults(handler=...)`; the handler takes the parsed arguments as a dict and returns
the exit code. Built-in commands are listed in `BUILTIN`; a third-party package adds one
through the entry point group `ssrl.commands` (name = the command, value =
`package.module:register`), the way search backends are added through
`ssrl.search_backends`. A built-in name cannot be taken over.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "CommandSpec",
    "MissingExtra",
    "build_parser",
    "commands",
    "main",
]

ENTRY_POINT_GROUP = "ssrl.commands"
# Our own packages: a ModuleNotFoundError naming one of them is a bug, not a missing extra.
_OWN = frozenset({"clients", "server", "router"})
# Modules that come with an engine extra rather than with `server`.
_ENGINE_MODULES = frozenset({"vllm", "torch", "gguf", "accelerate", "transformers"})

Register = Callable[[Any], None]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One top-level `ssrl` command, not yet imported."""

    name: str
    # "module:function" of its `register(subparsers)`.
    target: str
    help: str
    # The extra that installs what it needs (None: the base install suffices).
    extra: str | None = None

    def load(self) -> Register:
        module_name, _, attr = self.target.partition(":")
        register: Register = getattr(importlib.import_module(module_name), attr or "register")
        return register


BUILTIN: tuple[CommandSpec, ...] = (
    CommandSpec(
        "serve",
        "server.commands:register_serve",
        "Start the server (embedded default model unless --model).",
        "server",
    ),
    CommandSpec("model", "server.commands:register_model", "Manage the embedded default model.", "server"),
    CommandSpec("index", "server.commands:register_index", "Build the local BM25 search index.", "server"),
    CommandSpec(
        "devset",
        "server.devset_command:register",
        "Build the development QA set whose answers are in the default index.",
        "server",
    ),
    CommandSpec(
        "chat", "clients.chat:register", "Ask a running server a question and show its self-search trace."
    ),
    CommandSpec(
        "eval",
        "clients.eval_cli:register_eval",
        "Score a QA set against a running server (EM, F1, pass@k, search calls).",
    ),
    CommandSpec(
        "calibrate",
        "clients.eval_cli:register_calibrate",
        "Choose the routing threshold from eval runs; write calibration.env.",
    ),
)


def commands() -> dict[str, CommandSpec]:
    """Every command by name: the built-ins, then the `ssrl.commands` entry points."""
    out = {spec.name: spec for spec in BUILTIN}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in out:
            source = ep.dist.name if ep.dist is not None else ep.value
            out[ep.name] = CommandSpec(ep.name, ep.value, f"(from {source})")
    return out


class MissingExtra(Exception):
    """A command's dependencies are not installed; the message names the extra."""


def _missing_extra(spec: CommandSpec, exc: ModuleNotFoundError) -> MissingExtra | None:
    missing = (exc.name or "").split(".")[0]
    if not missing or missing in _OWN:
        return None
    if missing in _ENGINE_MODULES:
        hint = "pip install 'ssrl[cpu]' (or 'ssrl[gpu]')"
    elif spec.extra:
        hint = f"pip install 'ssrl[{spec.extra}]'"
    else:
        hint = f"pip install {missing}"
    return MissingExtra(f"ssrl {spec.name}: the module {missing!r} is not installed; install it: {hint}")


class _StandIn(argparse.ArgumentParser):
    """The parser of a command that cannot load: takes any arguments, explains why."""

    def __init__(self, spec: CommandSpec, problem: MissingExtra) -> None:
        super().__init__(prog=f"ssrl {spec.name}", add_help=False)
        self.problem = problem

    def explain(self, _: dict[str, Any]) -> int:
        print(self.problem, file=sys.stderr)
        return 2

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace = namespace or argparse.Namespace()
        namespace.handler = self.explain
        return namespace, []


def _stub(subparsers: Any, spec: CommandSpec, problem: MissingExtra) -> None:
    subparsers.add_parser(spec.name, help=f"{spec.help} [{problem}]")
    subparsers.choices[spec.name] = _StandIn(spec, problem)


def build_parser(*names: str, stand_ins: bool = True) -> argparse.ArgumentParser:
    """The `ssrl` parser with the full parsers of `names` (every command when none is given).

    A command whose dependencies are missing gets a stand-in that prints the extra to
    install (`stand_ins=False`: the ModuleNotFoundError propagates instead).
    """
    parser = argparse.ArgumentParser(
        prog="ssrl", description="OpenAI-compatible server for self-search models, and its client."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    known = commands()
    for name in names or tuple(known):
        spec = known[name]
        try:
            spec.load()(subparsers)
        except ModuleNotFoundError as exc:
            problem = _missing_extra(spec, exc)
            if problem is None or not stand_ins:
                raise
            _stub(subparsers, spec, problem)
    return parser


def _overview_parser() -> argparse.ArgumentParser:
    """Every command listed with its one-line help, none of them imported (`ssrl --help`)."""
    parser = argparse.ArgumentParser(
        prog="ssrl", description="OpenAI-compatible server for self-search models, and its client."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for spec in commands().values():
        subparsers.add_parser(spec.name, help=spec.help, add_help=False).add_argument(
            "rest", nargs=argparse.REMAINDER
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    known = commands()
    name = next((a for a in args_list if not a.startswith("-")), None)
    if name not in known:
        _overview_parser().parse_args(args_list)  # prints the usage or the help, and exits
        return 2
    spec = known[name]
    try:
        args = vars(build_parser(name, stand_ins=False).parse_args(args_list))
        args.pop("command")
        handler = args.pop("handler")
        return int(handler(args))
    except ModuleNotFoundError as exc:
        problem = _missing_extra(spec, exc)
        if problem is None:
            raise
        print(problem, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
