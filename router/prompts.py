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

# The embedded native model's (smollm2-135m-ssrl, trained by `train/`): the same protocol in a
# third of the tokens. It was trained with this prompt, so it is served with it; a prompt of a
# few dozen tokens halves the training time of a 150-token example and every request's prefill.
NATIVE_COMPACT = (
    "Answer the question. First write a search query inside <search> and </search>. The "
    "information it finds follows inside <information> and </information>. Then give the short "
    "answer inside <answer> and </answer>."
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
# answer out of one 300-character document about twice as often as out of three of 600, and
# out of one of 150 (the article's first sentence or so) more often than out of one of 300
# (docs/evaluation.md, "First impression").
GUIDED_DOCS_PER_SEARCH = 1
GUIDED_MAX_DOC_CHARS = 150


# Guided mode writes the user's question again right before `<answer>` ("Question: ...?"): a
# small model reads the information block and then answers what it was asked, instead of
# copying the block's first year or its title (docs/evaluation.md, "First impression").
GUIDED_RESTATE_QUESTION: bool = True
# A longer user message (a document to read, an agent's instructions) is not repeated: it would
# double the prompt, and the question in it is not a line to answer.
GUIDED_RESTATE_MAX_CHARS = 300


def answer_cue(question: str) -> str:
    """What guided mode writes between `</information>` and `<answer>` besides newlines."""
    question = " ".join(question.split())
    if not GUIDED_RESTATE_QUESTION or not question or len(question) > GUIDED_RESTATE_MAX_CHARS:
        return ""
    return f"Question: {question}\n"


def _example(query: str, documents: tuple[tuple[str, str], ...], answer: str, question: str = "") -> str:
    """One worked transcript, laid out as the loop writes it (documents as the server inserts
    them: Search-R1's `Doc i(Title: ...) text`)."""
    info = "\n".join(f"Doc {i}(Title: {title}) {text}" for i, (title, text) in enumerate(documents, 1))
    return (
        f"<search> {query} </search>\n\n<information>{info}</information>\n\n"
        f"{answer_cue(question)}<answer> {answer} </answer>"
    )


# Guided mode shows the model worked exchanges before the real question: a small model copies
# the shape of an example far more reliably than it follows an instruction. They are varied
# (a person, a country, a number, a date, a city, a symbol); each query names the entity the
# question is about (never a year or the question's own numbers); each answer is a few words
# copied from the document, which names the question's subject but also holds a year or a
# number that is NOT the answer (the 135M model otherwise answers "Who wrote ...?" with a year
# from the document, or with its title).
GUIDED_EXAMPLES: tuple[tuple[str, tuple[str, tuple[tuple[str, str], ...], str]], ...] = (
    (
        "Who wrote the novel Oliver Twist?",
        (
            "Oliver Twist novel author",
            (
                (
                    "Oliver Twist",
                    "Oliver Twist is the second novel by the English author Charles Dickens, published in 1838.",
                ),
            ),
            "Charles Dickens",
        ),
    ),
    (
        "In which country is Mount Kilimanjaro?",
        (
            "Mount Kilimanjaro country",
            (
                (
                    "Mount Kilimanjaro",
                    "Mount Kilimanjaro is a dormant volcano in Tanzania, 5,895 metres above sea level.",
                ),
            ),
            "Tanzania",
        ),
    ),
    (
        "How many legs does a spider have?",
        (
            "spider legs",
            (
                (
                    "Spider",
                    "Spiders are air-breathing arthropods with eight legs; about 50,000 species are known.",
                ),
            ),
            "eight",
        ),
    ),
    (
        "In what year did the Wright brothers make their first flight?",
        (
            "Wright brothers first flight",
            (
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
        "What is the capital of Portugal?",
        (
            "Portugal capital city",
            (("Portugal", "Portugal is a country of 10 million people whose capital is Lisbon."),),
            "Lisbon",
        ),
    ),
    (
        "What is the chemical symbol for copper?",
        (
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
    for question, (query, documents, answer) in GUIDED_EXAMPLES:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": _example(query, documents, answer, question)})
    return messages


def system_prompt(mode: str, override: str | None = None) -> str:
    if override:
        return override
    return GUIDED if mode == "guided" else NATIVE
