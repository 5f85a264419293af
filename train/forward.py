"""Forward questions: asked about one article, answered by a name written in its text.

The dev set's templates (`router.search.devset.candidates`) mostly ask for an article by its
description ("Which city is the capital of Sichuan?" -> the title), so a model trained on them
alone learns to answer with the title of the document it reads: given the article "Mona Lisa" it
answers "Mona Lisa" to "Who painted the Mona Lisa?". These templates ask the other way round, as
people do, and their answer is another article of the corpus named in the text:

* **creator**: "Hamlet ... written by William Shakespeare" -> "Who wrote Hamlet?"
  (the named article must be about a person);
* **capital**: "Its capital and largest city is Luanda" -> "What is the capital of Angola?";
* **city**: "The Eiffel Tower is a lattice tower ... in Paris, France" -> "In which city is the
  Eiffel Tower?" (the city and the country both articles of the corpus);
* **element**: "Iron is a chemical element; it has symbol Fe and atomic number 26" -> "What is
  the chemical symbol for iron?" or "What is the atomic number of iron?".

Pure: documents in, rows out. The passage of a row is the sentence that holds the answer, so an
inserted document cut to a few hundred characters still holds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from router.search.devset import CorpusDoc, leaks, plain_title, split_sentences

__all__ = [
    "QUESTION_BY_VERB",
    "TEMPLATES",
    "TRAINED_TEMPLATES",
    "city_titles",
    "forward_candidates",
    "person_titles",
]

TEMPLATES = ("creator", "capital", "city", "element")
# The templates of the shipped adapter's data (`python -m train.make_data`'s default). city and
# element are written and tested; the next data round adds them (docs/native-model.md: the
# first-impression questions the adapter still answers with a title are places and elements).
TRAINED_TEMPLATES = ("creator", "capital")

# The passive verb of the text -> the question people ask.
QUESTION_BY_VERB: Mapping[str, str] = {
    "written": "Who wrote {}?",
    "authored": "Who wrote {}?",
    "directed": "Who directed {}?",
    "painted": "Who painted {}?",
    "composed": "Who composed {}?",
    "sculpted": "Who sculpted {}?",
    "designed": "Who designed {}?",
    "created": "Who created {}?",
    "founded": "Who founded {}?",
    "co-founded": "Who founded {}?",
    "invented": "Who invented {}?",
    "discovered": "Who discovered {}?",
    "developed": "Who developed {}?",
    "proposed": "Who proposed {}?",
    "formulated": "Who formulated {}?",
    "built": "Who built {}?",
}

_NAME = r"[A-Z][^\s,;.()]*(?: (?:[A-Z][^\s,;.()]*|de|da|van|von|of|al-[A-Z][^\s,;.()]*)){0,4}"
# "written by the English playwright William Shakespeare": up to five words of description
# between "by" and the name.
_BY_RE = re.compile(
    r"\b(?P<verb>" + "|".join(QUESTION_BY_VERB) + r") by (?:[\w'-]+ ){0,5}?(?P<name>" + _NAME + ")"
)
_CAPITAL_RE = re.compile(
    r"\b[Cc]apital(?: city)?(?: and (?:largest|most populous) city)? (?:is|was) (?:the city of )?(?P<name>"
    + _NAME
    + ")"
)
_CITY_RE = re.compile(
    r"\bin (?:the city of |central |downtown |northern |southern |eastern |western )?"
    r"(?P<city>[A-Z][\w'-]+(?: [A-Z][\w'-]+)?), (?P<country>[A-Z][\w'-]+(?: [A-Z][\w'-]+)?)\b"
)
_ELEMENT_RE = re.compile(
    r"^(?P<name>[A-Z][a-z]+) is a chemical element; it has (?:the )?(?:chemical )?symbol "
    r"(?P<symbol>[A-Z][a-z]?) and atomic number (?P<number>\d+)"
)
_PERSON_WORDS = frozenset({"he", "she", "his", "her"})


def person_titles(docs: Iterable[CorpusDoc]) -> set[str]:
    """Plain titles of the articles about a person: a summary that says he/she/his/her twice,
    or one sentence long that opens with "<title> was a"."""
    out: set[str] = set()
    for doc in docs:
        words = re.findall(r"[a-z]+", doc.text.lower())
        name = plain_title(doc.title)
        if sum(w in _PERSON_WORDS for w in words) >= 2 or doc.text.startswith(f"{name} was a"):
            out.add(name)
    return out


def city_titles(docs: Iterable[CorpusDoc]) -> set[str]:
    """Plain titles of the articles whose first sentence says they are a city or a capital."""
    out: set[str] = set()
    for doc in docs:
        sentences = split_sentences(doc.text)
        if sentences and re.search(r"\b(?:city|capital|town|metropolis)\b", sentences[0]):
            out.add(plain_title(doc.title))
    return out


def _whole_title(name: str, titles: set[str]) -> str | None:
    """``name`` when it is a title as a whole: a title that is only its first words ("Port"
    of "Port Moresby", "Walt Disney" of "Walt Disney Company") names something else."""
    name = re.sub(r" (?:of|de|da|van|von)$", "", name)
    return name if len(name) > 3 and name in titles else None


def _about(before: str, subject: str) -> bool:
    """Whether the words before the match speak of the article ("Hamlet ... was written by",
    "Its capital is"), not of something else it mentions ("Kofi Annan ... founded by")."""
    return subject.lower() in before.lower() or re.match(r"(?:It|Its|The [a-z]+)\b", before) is not None


def _answers(name: str) -> list[str]:
    """The full name, and the surname alone for a person of several names ("Shakespeare")."""
    parts = name.split()
    if len(parts) >= 2 and parts[-1][:1].isupper() and len(parts[-1]) > 3:
        return [name, parts[-1]]
    return [name]


def _creator(doc: CorpusDoc, sentences: Sequence[str], persons: set[str]) -> Iterator[dict[str, Any]]:
    subject = plain_title(doc.title)
    for sentence in sentences[:4]:
        match = _BY_RE.search(sentence)
        if match is None:
            continue
        name = _whole_title(match["name"], persons)
        if name is None or name == subject or not _about(sentence[: match.start()], subject):
            continue
        yield {
            "template": "creator",
            "question": QUESTION_BY_VERB[match["verb"]].format(subject),
            "answers": _answers(name),
            "sentence": sentence,
        }
        return


def _capital(doc: CorpusDoc, sentences: Sequence[str], titles: set[str]) -> Iterator[dict[str, Any]]:
    subject = plain_title(doc.title)
    for sentence in sentences[:6]:
        match = _CAPITAL_RE.search(sentence)
        if match is None:
            continue
        name = _whole_title(match["name"], titles)
        if name is None or name == subject or not _about(sentence[: match.start()], subject):
            continue
        yield {
            "template": "capital",
            "question": f"What is the capital of {subject}?",
            "answers": [name],
            "sentence": sentence,
        }
        return


def _the(subject: str, sentence: str) -> str:
    """The subject as the sentence names it: "the Eiffel Tower" where it says "The Eiffel"."""
    return f"the {subject}" if sentence.startswith(f"The {subject}") else subject


def _city(
    doc: CorpusDoc, sentences: Sequence[str], cities: AbstractSet[str], countries: AbstractSet[str]
) -> Iterator[dict[str, Any]]:
    subject = plain_title(doc.title)
    if not sentences:
        return
    sentence = sentences[0]
    match = _CITY_RE.search(sentence)
    if match is None or not _about(sentence[: match.start()], subject):
        return
    city, country = match["city"], match["country"]
    if city == subject or city not in cities or country not in countries:
        return
    yield {
        "template": "city",
        "question": f"In which city is {_the(subject, sentence)}?",
        "answers": [city],
        "sentence": sentence,
    }


def _element(doc: CorpusDoc, sentences: Sequence[str]) -> Iterator[dict[str, Any]]:
    if not sentences or (match := _ELEMENT_RE.match(sentences[0])) is None:
        return
    name = match["name"].lower()
    yield {
        "template": "element",
        "question": f"What is the chemical symbol for {name}?",
        "answers": [match["symbol"]],
        "sentence": sentences[0],
    }
    yield {
        "template": "element",
        "question": f"What is the atomic number of {name}?",
        "answers": [match["number"]],
        "sentence": sentences[0],
    }


def forward_candidates(
    doc: CorpusDoc,
    titles: AbstractSet[str],
    persons: AbstractSet[str],
    cities: AbstractSet[str] = frozenset(),
    countries: AbstractSet[str] = frozenset(),
    templates: Sequence[str] = TEMPLATES,
) -> list[dict[str, Any]]:
    """The forward questions one document makes (``titles``: every plain title of the corpus;
    ``persons``, ``cities``, ``countries``: those about a person, a city, a country). None whose
    answer is given away by the question."""
    sentences = split_sentences(doc.text)
    out: list[dict[str, Any]] = []
    made = (
        *_creator(doc, sentences, persons),
        *_capital(doc, sentences, titles),
        *_city(doc, sentences, cities, countries),
        *_element(doc, sentences),
    )
    for row in made:
        if row["template"] not in templates:
            continue
        if leaks(row["answers"][0], row["question"]):
            continue
        row["answers"] = [a for a in row["answers"] if not leaks(a, row["question"])]
        out.append({**row, "gold_title": doc.title})
    return out
