"""The server's commands: `ssrl serve`, `ssrl model prepare`, `ssrl index build`.

They live with the server because they need it (fastapi, uvicorn, pydantic-settings, the
engine). The `ssrl` entry point (`clients.cli`) imports this module only when one of these
commands runs, so the client commands work where only the base install is present, and
these print which extra to install when the server's dependencies are missing.

Each `register_*` adds one top-level command to the `ssrl` parser with
`set_defaults(handler=...)`; the handler takes the parsed arguments as a dict and returns
the exit code (the protocol of `clients.cli`). Only the standard library is imported at
module level; the settings, the app and the engine are imported when a command is built or run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo


__all__ = ["add_settings_flags", "register_index", "register_model", "register_serve"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `Annotated[list[str], ...]` -> list[str]."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    return annotation


def add_settings_flags(parser: argparse.ArgumentParser, fields: dict[str, FieldInfo]) -> None:
    """One flag per settings field; unset flags stay out so the environment can apply."""
    for name, info in fields.items():
        kind = _base_type(info.annotation)
        help_text = info.description or ""
        if kind is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif typing.get_origin(kind) is list:
            # `--flag a b` (vLLM's form, as in --lora-modules) and `--flag a --flag b` alike.
            parser.add_argument(
                _flag(name),
                dest=name,
                action="extend",
                nargs="+",
                default=argparse.SUPPRESS,
                help=help_text + " (repeatable)",
            )
        else:
            converter = kind if kind in (int, float) else str
            choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
            parser.add_argument(
                _flag(name),
                dest=name,
                type=converter,
                choices=choices,
                default=argparse.SUPPRESS,
                help=help_text,
            )


# ----- ssrl serve ---------------------------------------------------------------------------


def register_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from server.settings import ServeSettings

    serve = subparsers.add_parser(
        "serve",
        help="Start the server (embedded default model unless --model).",
        description="Every flag can also be set as SSRL_<NAME> in the environment; flags win.",
    )
    add_settings_flags(serve, ServeSettings.model_fields)
    serve.set_defaults(handler=serve_command)


def _exit_before_start_up(signum: int, _frame: Any) -> None:
    # Nothing runs yet (no engine, no socket): say so and leave at once.
    print(f"ssrl serve: signal {signum} before start-up; exiting", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def serve_command(flags: dict[str, Any]) -> int:
    from pydantic import ValidationError

    from server.settings import ServeSettings

    try:
        settings = ServeSettings(**flags)
        settings.extra_engine_args()
    except (ValidationError, ValueError) as exc:
        print(f"ssrl serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    # Until the server installs its own handlers (server/http_server.py), SIGTERM/SIGINT end
    # the process at once with a line that says so.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_start_up)
    # Logging (secrets redacted), the app, uvicorn with its request deadlines, the drain.
    from server.http_server import serve

    return serve(settings)


# ----- ssrl model prepare -------------------------------------------------------------------


def register_model(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = subparsers.add_parser("model", help="Manage the embedded default model.")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    prepare = model_commands.add_parser(
        "prepare", help="Convert the default model into the cache (done by serve when missing)."
    )
    prepare.add_argument(
        "--cache-dir", default=None, help="Cache directory (default: SSRL_CACHE_DIR or ~/.cache/ssrl)."
    )
    prepare.add_argument(
        "--native",
        action="store_true",
        help="Also fold the native self-search adapter into a model of its own "
        "(`ssrl serve --model smollm2-135m-ssrl`; done by serve when missing).",
    )
    model.set_defaults(handler=model_command)


def model_command(args: dict[str, Any]) -> int:
    from router.engine.default_model import ensure_default_checkpoint

    cache_dir = Path(args["cache_dir"]) if args.get("cache_dir") else None
    logging.basicConfig(level=logging.INFO)
    print(ensure_default_checkpoint(cache_dir))
    if args.get("native"):
        from router.engine.merge import ensure_native_checkpoint

        print(ensure_native_checkpoint(cache_dir))
    return 0


# ----- ssrl index build ---------------------------------------------------------------------


def register_index(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    index = subparsers.add_parser("index", help="Build the local BM25 search index.")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser(
        "build", help="Build an index from JSONL ({id, title, text, url?} per line), atomically."
    )
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="JSONL corpus to index.")
    source.add_argument(
        "--preset",
        choices=["wiki-summaries"],
        help="Build the default index from the offline Wikipedia summaries.",
    )
    build.add_argument("--out", help="Index directory (required with --input).")
    build.add_argument("--cache-dir", default=None, help="Cache directory for --preset.")
    build.add_argument("--no-progress", action="store_true", help="No progress bar.")
    index.set_defaults(handler=index_command)


def index_command(args: dict[str, Any]) -> int:
    from router.engine.default_model import default_cache_dir
    from router.search.default_corpus import ensure_default_index
    from router.search.local_index import build_index, read_index_info

    progress = not args["no_progress"]
    if args["preset"]:
        cache_dir = Path(args["cache_dir"]) if args["cache_dir"] else default_cache_dir()
        out = ensure_default_index(cache_dir, progress=progress)
    else:
        if not args["out"]:
            print("ssrl index build: --out is required with --input", file=sys.stderr)
            return 2
        try:
            build_index(Path(args["input"]), Path(args["out"]), source=args["input"], progress=progress)
        except (OSError, ValueError) as exc:
            print(f"ssrl index build: {exc}", file=sys.stderr)
            return 1
        out = Path(args["out"])
    info = read_index_info(out)
    print(f"{info.documents} documents indexed in {info.path}")
    return 0
