"""The system prompts that ship with the server, one per protocol mode.

A deployment can replace either with its own file (`--system-prompt-file`).
"""

from __future__ import annotations

# For models trained with SSRL: the paper's instruction, which such a model follows alone.
NATIVE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> "
    "first every time you get new information. After reasoning, if you find you lack some "
    "knowledge, you can call a search engine by <search> query </search>, and it will return "
    "the top searched results between <information> and </information>. You can search as "
    "many times as you want. If you find no further external knowledge needed, you can "
    "directly provide the answer inside <answer> and </answer> without detailed "
    "illustrations. For example, <answer> Beijing </answer>."
)

# For any instruct model: the server writes each opening tag and the model fills it, so the
# prompt only has to explain what goes inside each tag.
GUIDED = (
    "You answer questions by searching first. Inside <search> </search> write one short "
    "search query on a single line. Inside <information> </information> write the facts you "
    "know that answer that query, in one or two sentences. Inside <answer> </answer> write "
    "only the final short answer, a few words, for example <answer> Beijing </answer>."
)


# Guided mode shows the model one worked exchange before the real question: a small model
# copies the shape of an example far more reliably than it follows an instruction.
GUIDED_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Who wrote the play Hamlet?",
        "<search> author of the play Hamlet </search>\n\n"
        "<information>Hamlet is a tragedy written by William Shakespeare around 1600."
        "</information>\n\n<answer> William Shakespeare </answer>",
    ),
)


def example_messages(mode: str) -> list[dict[str, str]]:
    """The worked exchange(s) placed before the user's messages (guided mode only)."""
    if mode != "guided":
        return []
    messages = []
    for question, transcript in GUIDED_EXAMPLES:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": transcript})
    return messages


def system_prompt(mode: str, override: str | None = None) -> str:
    if override:
        return override
    return GUIDED if mode == "guided" else NATIVE
