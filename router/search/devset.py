"""A development QA set whose answers are stated in the default offline index.

Public QA sets (NQ, HotpotQA, ...) ask about facts the 10,033 offline Wikipedia summaries do
not hold, so a run against the local index scores 0 whatever the routing does. This module
writes questions from the summaries themselves, so every gold answer is stated in one
document of the index (its ``gold_title``), and grades each question by how well known its
entity probably is.

The core (:func:`build_devset` and what it calls) is pure: documents in, rows out, the same
rows for the same documents, size and seed. :func:`read_corpus` and :func:`write_devset` are
the only functions that touch files; :func:`ensure_devset` builds the set of the default
corpus into the cache directory (docs/evaluation.md, "Development set from the offline
corpus").

Templates (each gives a short gold answer that the question does not contain):

* ``definition_the``: "Vega is the brightest star in the northern constellation of Lyra." ->
  "What is the brightest star in the northern constellation of Lyra?" (answer: the title).
* ``definition_clue``: "X was a German filmmaker, photographer, and actress. She is considered
  one of ..." -> "Which German filmmaker, photographer, and actress is considered one of ...?"
  (answer: the title; the second sentence narrows an indefinite definition).
* ``year``: "It was founded in 1961." in the summary of OECD -> "In what year was OECD
  founded?" (answer: the year).
* ``country``: "Niamey is the capital and largest city of Niger." -> "In which country is
  Niamey located?" (answer: the country, itself a title of the corpus).

Grade: ``signal.mentions`` is the number of *other* summaries that contain the entity's name
(the title without its parenthetical, matched as whole lowercase words): the offline stand-in
for how often an article is linked. Fixed cut points (:data:`GRADE_CUTS`) bucket it into
:data:`GRADES`, from the most to the least mentioned.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_SEED",
    "DEFAULT_SIZE",
    "DEVSET_FILENAME",
    "DEVSET_VERSION",
    "GRADES",
    "GRADE_CUTS",
    "TEMPLATES",
    "CorpusDoc",
    "build_devset",
    "candidates",
    "ensure_devset",
    "grade_of",
    "leaks",
    "mention_counts",
    "read_corpus",
    "split_sentences",
    "write_devset",
]

# Bump when a template, the grading or the sampling changes: the rows change with it.
DEVSET_VERSION = 1
DEFAULT_SIZE = 300
DEFAULT_SEED = 0
# The preset `ssrl eval --data dev` reads <cache>/devsets/DEVSET_FILENAME.
DEVSET_FILENAME = "dev.jsonl"

# From the most mentioned entity to the least. A grade holds the entities with at least its
# cut point of mentions (and fewer than the previous grade's).
GRADES = ("famous", "known", "niche", "obscure")
GRADE_CUTS = (40, 10, 3, 0)

TEMPLATES = ("definition_the", "definition_clue", "year", "country")

_WORD_RE = re.compile(r"[^\W_]+")
_PAREN_RE = re.compile(r"\s*\([^)]*\)")
# A sentence ends at ". " before a capital letter, unless the dot closes a common abbreviation
# or an initial ("U.S. Army", "John F. Kennedy").
_SENTENCE_END_RE = re.compile(r"(?<=[^\s.])\.\s+(?=[A-Z\"'“(])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr mt no vs gen col lt sgt rev prof inc ltd co corp ca c fl ft approx est".split()
)
_DEFINITION_RE = re.compile(
    r"^(?P<subject>[^.;:]{1,120}?),? (?P<verb>is|was|are|were) (?P<det>the|a|an) (?P<rest>.+?)\.?$"
)
_CLUE_RE = re.compile(
    r"^(?P<pronoun>He|She|It) (?P<rest>(?:is|was|has|had|became|[a-z]+ed|[a-z]+s)\b.+?)\.?$"
)
_YEAR_VERBS = (
    "founded",
    "established",
    "discovered",
    "invented",
    "published",
    "completed",
    "created",
    "formed",
    "built",
    "released",
    "launched",
    "dissolved",
    "abolished",
    "signed",
)
_YEAR_RE = re.compile(
    r"^(?P<subject>It|The [a-z]+|[^,;]{1,80}?) (?:was|were) (?:first |originally |officially )?"
    r"(?P<verb>" + "|".join(_YEAR_VERBS) + r")(?: [a-z]+){0,2}? in (?P<year>1\d{3}|20\d{2})\b"
)
_PLACE_WORDS = (
    "city|town|capital|river|mountain|lake|region|province|state|island|port|village|"
    "municipality|desert|volcano|archipelago|peninsula|county|territory|department|metropolis"
)
_COUNTRY_DEF_RE = re.compile(
    r"^[^.;]{0,120}? (?:is|was) (?:a|an|the) (?:[\w-]+ ){0,4}?(?:country|sovereign state|nation)\b"
)
_PLACE_RE = re.compile(
    r"^(?P<subject>[^.;]{1,80}?),? (?:is|was) (?:the|a|an) (?:[\w-]+ ){0,5}?(?:" + _PLACE_WORDS + r")\b"
    r"(?P<tail>[^.;]*)$"
)
_COUNTRY_IN_RE = re.compile(
    r"\b(?:in|of) (?:the )?(?:(?:[a-z]+|[A-Z][a-z]+ern) )?(?P<name>[A-Z][\w'-]*(?: [A-Z][\w'-]*)*)"
)
# Indefinite definitions this long or longer are not narrowed enough to ask "Which ...".
_MAX_DEFINITION_WORDS = 25
_MIN_DEFINITION_WORDS = 4
_MAX_CLUE_WORDS = 22
_MAX_QUESTION_WORDS = 40
# Words never counted as leaking an answer (they carry no identity).
_LEAK_STOPWORDS = frozenset(
    """a an the of and or in on at to for by with from as is was are were be de la le du von van
    der den di da el al""".split()
)


@dataclass(frozen=True, slots=True)
class CorpusDoc:
    """One document of the index: its title and its text (the summary)."""

    title: str
    text: str


# ----------------------------------------------------------------------------- text helpers


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _stem(word: str) -> str:
    """A crude plural fold, enough for leak checks ("bees" ~ "bee")."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def plain_title(title: str) -> str:
    """The title without its disambiguation: "Mercury (planet)" -> "Mercury"."""
    return _PAREN_RE.sub("", title).strip() or title.strip()


def split_sentences(text: str) -> list[str]:
    """Sentences of a summary (a regex splitter that keeps abbreviations and initials whole)."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END_RE.finditer(text):
        before = text[start : match.start()]
        last = before.rsplit(None, 1)[-1].lower().strip("(\"'") if before.split() else ""
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()) or "." in last:  # "U.S."
            continue
        sentences.append(text[start : match.start()].strip())
        start = match.end()
    tail = text[start:].strip().rstrip(".").strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


def leaks(answer: str, question: str) -> bool:
    """True when a word of ``answer`` that names something is in ``question`` (plural-folded)."""
    asked = {_stem(w) for w in _words(question)}
    named = [_stem(w) for w in _words(answer) if w not in _LEAK_STOPWORDS]
    # A long name is also given away by a word built on its stem ("Australian" for
    # "Australia", "exploring" for "Exploration").
    return any(
        w in asked or (len(w) >= 5 and any(_shared_prefix(w, a) >= min(6, len(w)) for a in asked))
        for w in named
    )


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(" ,;:.")


def _balanced(text: str) -> bool:
    return text.count("(") == text.count(")") and text.count('"') % 2 == 0


def _refers_to(subject: str, title: str) -> bool:
    """Whether a sentence subject names the article ("The Apollo program", 'Helene "Leni" R.')."""
    wanted = [w for w in _words(plain_title(title)) if w not in _LEAK_STOPWORDS]
    have = set(_words(subject))
    return bool(wanted) and all(w in have for w in wanted)


def _trim_clause(text: str, max_words: int) -> str | None:
    """``text``, or its part before the first ", " or "; " when it has too many words."""
    if len(text.split()) <= max_words:
        return text
    # Only at a comma: a relative clause ("an organism that produces sperm") is often what
    # makes a definition unique.
    head = re.split(r"[,;] ", text, maxsplit=1)[0]
    if _MIN_DEFINITION_WORDS <= len(head.split()) <= max_words:
        return head
    return None


def _aliases(subject: str, title: str) -> list[str]:
    """Gold answers: the plain title, and the sentence's own name for it when short."""
    answers = [plain_title(title)]
    name = _clean(re.split(r",|\(| also | or ", subject, maxsplit=1)[0])
    name = re.sub(r"^(?:The|the|A|An) ", "", name).replace('"', "")
    # Only a fuller form of the same name ("James Cleveland Jesse Owens"), never a
    # lead-in such as "In linguistics".
    if (
        name
        and len(name.split()) <= 6
        and _refers_to(name, title)
        and name.lower() not in {a.lower() for a in answers}
    ):
        answers.append(name)
    return answers


_PERSON_ROLES = frozenset(
    """president king queen emperor empress founder leader son daughter wife husband bishop pope
    sultan pharaoh chancellor ruler monarch prince princess tsar caliph shah""".split()
)


def _is_person(sentences: Sequence[str], definition: str) -> bool:
    """ "Who" or "What": a summary that says he/she/his/her twice, or a role noun up front."""
    words = _words(" ".join(sentences))
    head = [w for w in _words(definition)[:4] if w not in _LEAK_STOPWORDS]
    return sum(w in {"he", "she", "his", "her"} for w in words) >= 2 or any(w in _PERSON_ROLES for w in head)


# ----------------------------------------------------------------------------- templates


@dataclass(frozen=True, slots=True)
class _Candidate:
    template: str
    question: str
    answers: tuple[str, ...]
    title: str


def _definition(doc: CorpusDoc, sentences: Sequence[str]) -> Iterator[_Candidate]:
    if not sentences:
        return
    match = _DEFINITION_RE.match(sentences[0])
    if match is None or not _refers_to(match["subject"], doc.title) or len(match["subject"].split()) > 12:
        return
    # "a chemical element; it has symbol Na ..." : the definition ends at the semicolon.
    rest = _trim_clause(_clean(match["rest"].split("; ")[0]), _MAX_DEFINITION_WORDS)
    if rest is None or len(rest.split()) < 2 or not _balanced(rest):
        return
    verb = match["verb"]
    answers = tuple(_aliases(match["subject"], doc.title))
    if match["det"] == "the":
        if len(rest.split()) < _MIN_DEFINITION_WORDS - 1:
            return
        wh = "Who" if _is_person(sentences, rest) else "What"
        yield _Candidate("definition_the", f"{wh} {verb} the {rest}?", answers, doc.title)
        return
    if len(sentences) < 2:
        return
    clue = _CLUE_RE.match(sentences[1])
    if clue is None:
        return
    tail = _trim_clause(_clean(clue["rest"]), _MAX_CLUE_WORDS)
    if tail is None or not _balanced(tail):
        return
    head = rest if len(rest.split()) <= 12 else _trim_clause(rest, 12)
    if head is None:
        return
    yield _Candidate("definition_clue", f"Which {head} {tail}?", answers, doc.title)


def _year(doc: CorpusDoc, sentences: Sequence[str]) -> Iterator[_Candidate]:
    found: dict[str, set[str]] = {}
    for sentence in sentences[:6]:
        match = _YEAR_RE.match(sentence)
        if match is None:
            continue
        subject = match["subject"]
        own = subject == "It" or re.fullmatch(r"The [a-z]+", subject) is not None
        if not own and not _refers_to(subject, doc.title):
            continue
        found.setdefault(match["verb"], set()).add(match["year"])
    for verb in sorted(found):
        years = found[verb]
        if len(years) == 1:  # one year per verb, or the question would be ambiguous
            (year,) = years
            yield _Candidate("year", f"In what year was {plain_title(doc.title)} {verb}?", (year,), doc.title)
            return


def _country(doc: CorpusDoc, sentences: Sequence[str], countries: Mapping[str, str]) -> Iterator[_Candidate]:
    if not sentences or doc.title in countries.values():
        return
    match = _PLACE_RE.match(sentences[0])
    if match is None or not _refers_to(match["subject"], doc.title):
        return
    # The first place the sentence puts it in must be the country, and the only one named:
    # "a region of the northern Indian Ocean bounded by ... the Gulf of Oman" is skipped.
    places = [m["name"] for m in _COUNTRY_IN_RE.finditer(match["tail"])]
    named = [countries[name] for name in places if name in countries]
    if not places or places[0] not in countries or len(set(named)) != 1:
        return
    yield _Candidate(
        "country", f"In which country is {plain_title(doc.title)} located?", (named[0],), doc.title
    )


def country_titles(docs: Iterable[CorpusDoc]) -> dict[str, str]:
    """Name -> title of the documents whose first sentence says they are a country."""
    out: dict[str, str] = {}
    for doc in docs:
        sentences = split_sentences(doc.text)
        if sentences and _COUNTRY_DEF_RE.match(sentences[0]):
            out[plain_title(doc.title)] = doc.title
    return out


def candidates(doc: CorpusDoc, countries: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every question the templates make from one document that passes the checks.

    A question is kept when it has at most :data:`_MAX_QUESTION_WORDS` words and none of its
    gold answers leaks into it (an alias that leaks is dropped instead, if the title does not).
    """
    sentences = split_sentences(doc.text)
    made = [
        *_definition(doc, sentences),
        *_year(doc, sentences),
        *_country(doc, sentences, countries or {}),
    ]
    out: list[dict[str, Any]] = []
    for cand in made:
        question = re.sub(r"\s+", " ", cand.question)
        if len(question.split()) > _MAX_QUESTION_WORDS:
            continue
        if leaks(cand.answers[0], question):
            continue
        answers = [a for a in cand.answers if not leaks(a, question)]
        out.append(
            {"question": question, "answers": answers, "gold_title": cand.title, "template": cand.template}
        )
    return out


# ----------------------------------------------------------------------------- grading


def mention_counts(docs: Sequence[CorpusDoc]) -> dict[str, int]:
    """Title -> how many *other* documents contain its plain title as whole words.

    Matching is on lowercase word sequences, so "Mercury (planet)" counts every summary that
    says "mercury". It stands in for the number of links to an article.
    """
    keys: dict[str, tuple[str, ...]] = {}
    lengths: dict[str, set[int]] = {}
    for doc in docs:
        key = tuple(_words(plain_title(doc.title)))
        if key:
            keys[doc.title] = key
            lengths.setdefault(key[0], set()).add(len(key))
    wanted = set(keys.values())
    hits: dict[tuple[str, ...], int] = dict.fromkeys(wanted, 0)
    own_titles = [keys.get(doc.title) for doc in docs]
    for doc, own in zip(docs, own_titles, strict=True):
        words = _words(doc.title + " " + doc.text)
        seen: set[tuple[str, ...]] = set()
        for i, word in enumerate(words):
            for n in lengths.get(word, ()):
                gram = tuple(words[i : i + n])
                if len(gram) == n and gram in wanted:
                    seen.add(gram)
        seen.discard(own)
        for gram in seen:
            hits[gram] += 1
    return {title: hits[key] for title, key in keys.items()}


def grade_of(mentions: int) -> str:
    """The grade of an entity mentioned in ``mentions`` other documents."""
    for grade, cut in zip(GRADES, GRADE_CUTS, strict=True):
        if mentions >= cut:
            return grade
    return GRADES[-1]


# ----------------------------------------------------------------------------- the set


def _row_id(template: str, title: str) -> str:
    digest = hashlib.sha256(f"{template}\x00{title}".encode()).hexdigest()[:10]
    return f"dev-{digest}"


def build_devset(
    docs: Sequence[CorpusDoc], size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED
) -> list[dict[str, Any]]:
    """``size`` rows (fewer if the corpus offers fewer), balanced over grades and templates.

    At most one question per document. Sampling: the candidates are sorted, one per document is
    drawn with ``random.Random(seed)``, then the grades take turns (each grade's templates take
    turns within it), so every grade and template gets its share where the corpus has enough.
    Rows: ``{id, question, answers, gold_title, grade, signal: {mentions, summary_chars},
    template}``; ``id`` depends only on the template and the title.
    """
    if size <= 0:
        return []
    rng = random.Random(seed)
    ordered = sorted(docs, key=lambda d: d.title)
    countries = country_titles(ordered)
    mentions = mention_counts(ordered)
    pools: dict[str, dict[str, list[dict[str, Any]]]] = {g: {t: [] for t in TEMPLATES} for g in GRADES}
    for doc in ordered:
        made = candidates(doc, countries)
        if not made:
            continue
        row = made[rng.randrange(len(made))]
        count = mentions.get(doc.title, 0)
        grade = grade_of(count)
        pools[grade][row["template"]].append(
            {
                "id": _row_id(row["template"], doc.title),
                "question": row["question"],
                "answers": row["answers"],
                "gold_title": doc.title,
                "grade": grade,
                "signal": {"mentions": count, "summary_chars": len(doc.text)},
                "template": row["template"],
            }
        )
    queues: dict[str, list[list[dict[str, Any]]]] = {}
    for grade in GRADES:
        lists = []
        for template in TEMPLATES:
            pool = pools[grade][template]
            rng.shuffle(pool)
            if pool:
                lists.append(pool)
        queues[grade] = lists
    chosen: list[dict[str, Any]] = []
    turn = dict.fromkeys(GRADES, 0)
    while len(chosen) < size and any(queues.values()):
        for grade in GRADES:
            lists = queues[grade]
            if not lists or len(chosen) >= size:
                continue
            i = turn[grade] % len(lists)
            chosen.append(lists[i].pop())
            if lists[i]:
                turn[grade] = i + 1
            else:
                del lists[i]
                turn[grade] = i
    rng.shuffle(chosen)
    return chosen


# ----------------------------------------------------------------------------- files


def read_corpus(path: Path) -> list[CorpusDoc]:
    """The ``{title, text}`` documents of an index JSONL file (the format `ssrl index build` reads)."""
    docs: list[CorpusDoc] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("title"), str)
                or not isinstance(obj.get("text"), str)
            ):
                raise ValueError(f"{path}:{number}: expected an object with 'title' and 'text' strings")
            docs.append(CorpusDoc(obj["title"], obj["text"]))
    return docs


def write_devset(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write the rows as JSONL to a temporary file beside ``path``, fsync, rename over ``path``.

    On any failure (a row that is not JSON, a full disk) the temporary file is removed and
    ``path`` keeps what it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_devset(
    cache_dir: Path,
    out: Path | None = None,
    *,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEED,
    rebuild: bool = False,
) -> tuple[Path, int]:
    """Build the set of the default corpus (downloaded if needed) and return (path, rows).

    ``out`` defaults to ``cache_dir/devsets/dev.jsonl``, the file of `ssrl eval --data dev`;
    an existing file is kept unless ``rebuild``.
    """
    from router.search.default_corpus import (
        DEFAULT_INDEX_NAME,
        WIKI_VERSION,
        fetch_wiki_summaries,
        wiki_summaries_to_jsonl,
    )

    cache_dir = Path(cache_dir)
    out = Path(out) if out is not None else cache_dir / "devsets" / DEVSET_FILENAME
    if out.is_file() and not rebuild:
        with open(out, encoding="utf-8") as f:
            return out, sum(1 for line in f if line.strip())
    corpus = cache_dir / "corpora" / f"{DEFAULT_INDEX_NAME}-{WIKI_VERSION}.jsonl"
    if not corpus.is_file():
        wiki_summaries_to_jsonl(fetch_wiki_summaries(cache_dir / "downloads"), corpus)
    rows = build_devset(read_corpus(corpus), size=size, seed=seed)
    write_devset(out, rows)
    return out, len(rows)
