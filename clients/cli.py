"""The `ssrl` command: `ssrl serve`, `ssrl model prepare`, and the tools around them."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic.fields import FieldInfo


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
            parser.add_argument(
                _flag(name),
                dest=name,
                action="append",
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


EXTRA_COMMANDS: tuple[str, ...] = ("clients.chat", "clients.eval_cli")


def build_parser() -> argparse.ArgumentParser:
    from server.settings import ServeSettings

    parser = argparse.ArgumentParser(
        prog="ssrl", description="OpenAI-compatible server for self-search models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="Start the server (embedded default model unless --model).",
        description="Every flag can also be set as SSRL_<NAME> in the environment; flags win.",
    )
    add_settings_flags(serve, ServeSettings.model_fields)

    model = commands.add_parser("model", help="Manage the embedded default model.")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    prepare = model_commands.add_parser(
        "prepare", help="Convert the default model into the cache (done by serve when missing)."
    )
    prepare.add_argument(
        "--cache-dir", default=None, help="Cache directory (default: SSRL_CACHE_DIR or ~/.cache/ssrl)."
    )

    index = commands.add_parser("index", help="Build the local BM25 search index.")
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

    # Further commands live in their own modules: each has `register(subparsers)`, which
    # adds its parser with `set_defaults(handler=...)`; the handler takes the parsed
    # arguments as a dict and returns the exit code.
    for module_name in EXTRA_COMMANDS:
        import importlib

        importlib.import_module(module_name).register(commands)
    return parser


def _index_build(args: dict[str, Any]) -> int:
    from pathlib import Path

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


def _serve(flags: dict[str, Any]) -> int:
    from pydantic import ValidationError

    from server.app import create_app
    from server.settings import ServeSettings

    try:
        settings = ServeSettings(**flags)
        settings.extra_engine_args()
    except (ValidationError, ValueError) as exc:
        print(f"ssrl serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from server.lifecycle import DrainingServer, uvicorn_config

    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings), app.state.drainer).run()
    return 0


def _prepare(cache_dir: str | None) -> int:
    from pathlib import Path

    from router.engine.default_model import ensure_default_checkpoint

    logging.basicConfig(level=logging.INFO)
    print(ensure_default_checkpoint(Path(cache_dir) if cache_dir else None))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    handler = args.pop("handler", None)
    if handler is not None:
        return int(handler(args))
    if command == "serve":
        return _serve(args)
    if command == "model":
        return _prepare(args.get("cache_dir"))
    if command == "index":
        return _index_build(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
