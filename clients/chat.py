"""`ssrl chat`: ask a running ssrl server, and watch it search.

    ssrl chat "Who painted the Mona Lisa?" --policy always
    ssrl chat                         # interactive: one question per line, until EOF or `exit`
    ssrl chat "..." --json            # the raw response JSON (not streamed)

The reasoning streams as the model writes it; each search is shown as soon as it is
decided (query, entropy, decision, the documents' titles), then the answer. Output is
formatted with rich on a terminal (`--color always` forces it) and plain when piped or
when rich is not installed (it comes with the `client-extras` extra).
Server and connection errors print one line on stderr and exit with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO, get_args

from clients.client import (
    AnswerDelta,
    Policy,
    ReasoningDelta,
    SearchDecided,
    SearchRecord,
    SSRLClient,
    SSRLError,
    Trace,
    TraceEvent,
    Usage,
)

EXIT_WORDS = frozenset({"exit", "quit", ":q"})
PROG = "ssrl chat"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="Ask a running server a question and show its self-search trace.",
        description="Ask a running ssrl server. Without a question, read one per line from "
        "stdin until EOF or `exit`.",
    )
    parser.add_argument("question", nargs="?", help="The question (omit for interactive mode).")
    conn = parser.add_argument_group("server")
    conn.add_argument(
        "--base-url", default=None, help="Server URL (default: SSRL_BASE_URL or http://127.0.0.1:8000)."
    )
    conn.add_argument("--api-key", default=None, help="Bearer key (default: SSRL_API_KEY).")
    conn.add_argument("--model", default=None, help="Model name (default: the server's first).")
    conn.add_argument("--timeout", type=float, default=300.0, help="Request timeout in seconds.")
    conn.add_argument("--max-retries", type=int, default=2, help="Retries on connection errors and 429/503.")
    routing = parser.add_argument_group("self-search routing")
    routing.add_argument(
        "--policy",
        metavar="POLICY",
        help=f"Routing policy: {', '.join(get_args(Policy))}, or one a server plugin adds.",
    )
    routing.add_argument("--threshold", type=float, help="tau in nats (min_prob: a probability).")
    routing.add_argument("--aggregate", choices=["mean", "max", "min_prob", "ssrl"])
    routing.add_argument("--mode", choices=["native", "guided"])
    routing.add_argument("--max-turns", type=int)
    routing.add_argument("--docs-per-search", type=int)
    routing.add_argument("--max-external-calls", type=int)
    routing.add_argument("--budget", type=int, help="External calls for the budget policy.")
    routing.add_argument("--votes", type=int, help="Majority vote over k trajectories.")
    routing.add_argument(
        "--no-search", action="store_true", help="Plain generation (self_search.enabled = false)."
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--seed", type=int)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--json", action="store_true", help="Print the raw response JSON (non-streaming) and nothing else."
    )
    out.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="Rich formatting: auto (when stdout is a terminal), always, never.",
    )
    out.add_argument("--no-reasoning", action="store_true", help="Do not print the transcript.")
    parser.set_defaults(handler=run)


def _options(args: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": args.get("model"),
        "policy": args.get("policy"),
        "threshold": args.get("threshold"),
        "aggregate": args.get("aggregate"),
        "mode": args.get("mode"),
        "max_turns": args.get("max_turns"),
        "docs_per_search": args.get("docs_per_search"),
        "max_external_calls": args.get("max_external_calls"),
        "budget": args.get("budget"),
        "votes": args.get("votes"),
        "enabled": False if args.get("no_search") else None,
        "temperature": args.get("temperature"),
        "max_tokens": args.get("max_tokens"),
        "seed": args.get("seed"),
    }


# ----- rendering ----------------------------------------------------------------------------


def _entropy_line(record: SearchRecord) -> str:
    e = record.entropy
    return (
        f"entropy mean {e.mean:.3f} · max {e.max:.3f} · min_prob {e.min_prob:.3f} "
        f"({e.tokens} tokens, {e.kind or 'n/a'})"
    )


def _decision_line(record: SearchRecord) -> str:
    line = f"decision: {record.decision}"
    if record.reason:
        line += f" ({record.reason})"
    if record.decision == "external" and record.backend:
        line += f" via {record.backend} in {record.latency_s:.3f}s"
    if record.fallback:
        line += f"; fell back to self-fill: {record.fallback}"
    return line


def _summary_line(trace: Trace | None, usage: Usage | None) -> str | None:
    parts = []
    if trace is not None:
        parts.append(
            f"{trace.turns} search(es): {trace.external_calls} external, {trace.internal_fills} internal"
        )
        if trace.vote is not None:
            parts.append(f"vote {trace.vote.counts}")
    if usage is not None:
        parts.append(f"tokens {usage.prompt_tokens} prompt + {usage.completion_tokens} completion")
    return " · ".join(parts) or None


class PlainRenderer:
    """Plain text, for pipes and files."""

    def __init__(self, out: TextIO, show_reasoning: bool = True) -> None:
        self.out = out
        self.show_reasoning = show_reasoning
        self.at_line_start = True

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.at_line_start = text.endswith("\n")

    def _newline(self) -> None:
        if not self.at_line_start:
            self._write("\n")

    def reasoning(self, text: str) -> None:
        if self.show_reasoning:
            self._write(text)

    def answer_live(self, text: str, first: bool) -> None:
        if first:
            self._newline()
            self._write("Answer: ")
        self._write(text)

    def search(self, record: SearchRecord, number: int) -> None:
        self._newline()
        lines = [
            f"[search {number}] {record.query}",
            f"  {_entropy_line(record)}",
            f"  {_decision_line(record)}",
        ]
        lines += [f"  - {d.title}" + (f" <{d.url}>" if d.url else "") for d in record.documents]
        self._write("\n".join(lines) + "\n")

    def finish(self, answer: str, streamed_answer: bool, summary: str | None) -> None:
        self._newline()
        if not streamed_answer:
            self._write(f"Answer: {answer}\n")
        if summary:
            self._write(f"[{summary}]\n")


class RichRenderer(PlainRenderer):
    """The same content, styled with rich."""

    def __init__(self, console: Any, show_reasoning: bool = True) -> None:
        super().__init__(console.file, show_reasoning)
        self.console = console

    def _styled(self, text: str, style: str, end: str = "") -> None:
        from rich.text import Text

        self.console.print(Text(text, style=style), end=end, soft_wrap=True, highlight=False)
        self.console.file.flush()
        self.at_line_start = (text + end).endswith("\n")

    def _newline(self) -> None:
        if not self.at_line_start:
            self._styled("", "", end="\n")

    def reasoning(self, text: str) -> None:
        if self.show_reasoning and text:
            self._styled(text, "dim")

    def answer_live(self, text: str, first: bool) -> None:
        if first:
            self._newline()
            self._styled("Answer: ", "bold green")
        self._styled(text, "bold")

    def search(self, record: SearchRecord, number: int) -> None:
        from rich.panel import Panel
        from rich.text import Text

        self._newline()
        colour = {"external": "cyan", "internal": "magenta"}.get(record.decision, "yellow")
        body = Text()
        body.append("query: ", style="bold")
        body.append(record.query + "\n")
        body.append(_entropy_line(record) + "\n", style="dim")
        body.append(_decision_line(record), style=f"bold {colour}")
        for doc in record.documents:
            body.append("\n  • ")
            body.append(doc.title, style="underline")
            if doc.url:
                body.append(f"  {doc.url}", style="dim")
        self.console.print(
            Panel(body, title=f"search {number}", title_align="left", border_style=colour, expand=False)
        )
        self.console.file.flush()
        self.at_line_start = True

    def finish(self, answer: str, streamed_answer: bool, summary: str | None) -> None:
        self._newline()
        if not streamed_answer:
            self._styled("Answer: ", "bold green")
            self._styled(answer, "bold", end="\n")
        if summary:
            self._styled(summary, "dim", end="\n")


def make_renderer(color: str, show_reasoning: bool, out: TextIO | None = None) -> PlainRenderer:
    out = out or sys.stdout
    if color == "never":
        return PlainRenderer(out, show_reasoning)
    try:
        from rich.console import Console
    except ModuleNotFoundError:  # rich comes with the `client-extras` extra
        if color == "always":
            print("ssrl chat: --color always needs rich: pip install 'ssrl[client-extras]'", file=sys.stderr)
        return PlainRenderer(out, show_reasoning)

    if color == "always":
        console = Console(file=out, force_terminal=True, color_system="standard")
        return RichRenderer(console, show_reasoning)
    console = Console(file=out)  # honours a TTY, FORCE_COLOR, NO_COLOR and TERM=dumb
    if console.is_terminal and not console.is_dumb_terminal:
        return RichRenderer(console, show_reasoning)
    return PlainRenderer(out, show_reasoning)


# ----- one question -------------------------------------------------------------------------


def ask_streaming(
    client: SSRLClient,
    messages: list[dict[str, Any]],
    options: dict[str, Any],
    renderer: PlainRenderer,
) -> str:
    """Stream one answer (choice 0) through the renderer; returns the answer text."""
    answer: list[str] = []
    streamed_answer = saw_reasoning = False
    searches = 0
    trace: Trace | None = None
    usage: Usage | None = None
    finished = False
    for event in client.stream(messages, **options):
        if isinstance(event, Usage):
            usage = event
            continue
        if event.index != 0:
            continue
        if isinstance(event, ReasoningDelta):
            saw_reasoning = True
            renderer.reasoning(event.text)
        elif isinstance(event, AnswerDelta):
            answer.append(event.text)
            if not saw_reasoning:  # a plain server: the answer is all there is, stream it
                renderer.answer_live(event.text, first=not streamed_answer)
                streamed_answer = True
        elif isinstance(event, SearchDecided):
            searches += 1
            renderer.search(event.record, searches)
        elif isinstance(event, TraceEvent):
            trace = event.trace
            finished = True
    text = "".join(answer).strip()
    if trace is not None and trace.vote is not None and trace.vote.answer and not text:
        text = trace.vote.answer
    if not finished and not text:
        raise SSRLError("the stream ended before the answer")
    renderer.finish(text, streamed_answer, _summary_line(trace, usage))
    return text


def _run_one(
    client: SSRLClient, messages: list[dict[str, Any]], args: dict[str, Any], renderer: PlainRenderer | None
) -> str:
    options = _options(args)
    if args.get("json"):
        result = client.chat(messages, **options)
        print(json.dumps(result.raw, indent=2, ensure_ascii=False))
        return result.answer
    assert renderer is not None
    return ask_streaming(client, messages, options, renderer)


def _error(exc: BaseException) -> None:
    print(f"{PROG}: error: {exc}", file=sys.stderr)


def run(args: dict[str, Any]) -> int:
    renderer = (
        None if args.get("json") else make_renderer(args.get("color") or "auto", not args.get("no_reasoning"))
    )
    try:
        client = SSRLClient(
            args.get("base_url"),
            args.get("api_key"),
            timeout=args.get("timeout") or 300.0,
            max_retries=max(0, int(args.get("max_retries", 2) or 0)),
        )
    except (SSRLError, ValueError) as exc:
        _error(exc)
        return 1
    try:
        question = args.get("question")
        if question is not None:
            try:
                _run_one(client, [{"role": "user", "content": question}], args, renderer)
            except SSRLError as exc:
                _error(exc)
                return 1
            return 0
        return _interactive(client, args, renderer)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        client.close()


def _interactive(client: SSRLClient, args: dict[str, Any], renderer: PlainRenderer | None) -> int:
    """One question per line; the conversation (questions and answers) is kept."""
    history: list[dict[str, Any]] = []
    status = 0
    prompt = sys.stdin.isatty() and os.environ.get("TERM") != "dumb"
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            break
        messages = [*history, {"role": "user", "content": question}]
        try:
            answer = _run_one(client, messages, args, renderer)
        except SSRLError as exc:
            _error(exc)
            status = 1
            continue
        history = [*messages, {"role": "assistant", "content": answer}]
    return status
