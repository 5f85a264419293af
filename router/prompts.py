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
    "search query on a single line that names the people, places or things the question is "
    "about. The <information> </information> block holds the documents the search found; when "
    "it holds none, write there the facts you know, in one or two sentences. Inside <answer> "
    "</answer> write only the answer, a few words taken from the information, for example "
    "<answer> Beijing </answer>."
)


# What guided mode inserts per search unless the operator (`--docs-per-search`,
# `--max-doc-chars`) or the request (`docs_per_search`) says otherwise: a 135M model read the
# answer out of one 300-character document about twice as often as out of three of 600
# (docs/evaluation.md, "First impression").
GUIDED_DOCS_PER_SEARCH = 1
GUIDED_MAX_DOC_CHARS = 300


def _example(query: str, documents: tuple[tuple[str, str], ...], answer: str) -> str:
    """One worked transcript, laid out as the loop writes it (documents as the server inserts
    them: Search-R1's `Doc i(Title: ...) text`)."""
    info = "\n".join(f"Doc {i}(Title: {title}) {text}" for i, (title, text) in enumerate(documents, 1))
    return f"<search> {query} </search>\n\n<information>{info}</information>\n\n<answer> {answer} </answer>"


# Guided mode shows the model worked exchanges before the real question: a small model copies
# the shape of an example far more reliably than it follows an instruction. They are varied
# (a person, a place, a number, a date, a symbol); each query names the entity the question is
# about (never a year or the question's own numbers), the document holding the answer is not
# always the first, and each answer is a few words copied from that document.
GUIDED_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Who wrote the novel Oliver Twist?",
        _example(
            "Oliver Twist novel author",
            (
                ("Oliver Twist", "Oliver Twist is the second novel by the English author Charles Dickens."),
                ("David Lean", "David Lean was an English filmmaker who directed a film of Oliver Twist."),
            ),
            "Charles Dickens",
        ),
    ),
    (
        "What is the capital of Portugal?",
        _example(
            "Portugal capital city",
            (
                ("Portugal", "Portugal is a country in Southwestern Europe, on the Iberian Peninsula."),
                ("Lisbon", "Lisbon is the capital and most populous city of Portugal."),
            ),
            "Lisbon",
        ),
    ),
    (
        "How many legs does a spider have?",
        _example(
            "spider legs",
            (
                ("Spider", "Spiders are air-breathing arthropods that have eight legs and fangs."),
                ("Insect", "Insects have a three-part body and three pairs of jointed legs."),
            ),
            "eight",
        ),
    ),
    (
        "In what year did the Wright brothers make their first flight?",
        _example(
            "Wright brothers first flight",
            (
                (
                    "Charles Lindbergh",
                    "Charles Lindbergh made the first nonstop flight from New York to Paris.",
                ),
                (
                    "Wright brothers",
                    "The Wright brothers, Orville and Wilbur, made the first powered airplane flight "
                    "on December 17, 1903.",
                ),
            ),
            "1903",
        ),
    ),
    (
        "What is the chemical symbol for copper?",
        _example(
            "copper chemical element symbol",
            (("Copper", "Copper is a chemical element; it has symbol Cu and atomic number 29."),),
            "Cu",
        ),
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
