"""What may keep two queries apart however close their embeddings are: the semantic cache's
vetoes.

Sentence embeddings place "compound interest on $1,000 at 5% for 10 years" and the same at 7%
a hair apart, and "keep the odd numbers" next to "keep the even numbers": a few tokens out of
many barely move a mean-pooled vector, and antonyms sit close in embedding space, yet they are
exactly the tokens the answer turns on. So a candidate hit must also agree with the new query on:

- **numbers**: every number (digits, decimals, ordinals like 3rd, number words from two to
  twenty and the round ones, "double" and "triple" as 2x and 3x) as a multiset;
- **negation**: whether it negates or excludes at all (not, no, never, without, except, n't,
  non-, -free, ...);
- **named entities**: a word written as a name (capitalised inside a sentence, all capitals,
  mixed case, or letters with digits like GPT-4) in one query and missing from the other,
  where the other puts something in its place: a name of its own, or almost nothing else new
  ("weather in Paris today" against "weather in lyon today"). A paraphrase that rewords the
  whole query around a name it leaves out is not vetoed for it;
- **substitutions**: two queries worded almost alike (at least half of their content words
  shared) that still differ in a content word: when the wording is the same, the words that
  differ were chosen on purpose ("per year" / "per month", "local" / "remote"), and a
  mean-pooled embedding cannot weigh them. Words one typo apart count as the same;
- **contrasts**: two different members of a set of alternatives (odd/even, local/remote,
  sunrise/sunset, who/when/where/why, children/teenagers/adults, today/tomorrow/this week,
  ...) where neither query holds the other's.

The lists are general English and programming vocabulary, extended from the tuning split of the
frozen pairs (never the test split: docs/benchmarks.md, "Semantic cache"). Each check is a
regular-expression pass over two short texts, and fails safe: a vetoed hit is a miss, which
costs a generation, not a wrong answer.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum


class Veto(StrEnum):
    NUMBERS = "numbers"
    NEGATION = "negation"
    ENTITIES = "entities"
    CONTRAST = "contrast"
    SUBSTITUTION = "substitution"


# Words, with their original case (names are found by case); hyphens and slashes split words.
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9+#']*")
_NUMBER = re.compile(r"(?<![A-Za-z0-9])\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th|k|m|x)?(?![A-Za-z])", re.I)
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "_",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
    if w != "_"
} | {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "hundred": "100",
    "thousand": "1000",
    "million": "1000000",
    "billion": "1000000000",
    "dozen": "12",
    "second": "2nd",
    "third": "3rd",
    "fourth": "4th",
    "fifth": "5th",
    "double": "2x",
    "doubles": "2x",
    "doubled": "2x",
    "doubling": "2x",
    "triple": "3x",
    "triples": "3x",
    "tripled": "3x",
    "tripling": "3x",
}
# Not numbers here, though they can be: "one" is mostly a pronoun, "first" an order
# ("first"/"last" is a contrast below). "second" is 2nd (as a unit of time too: it fails safe).
_NEGATIONS = {
    "not",
    "no",
    "never",
    "none",
    "nor",
    "neither",
    "without",
    "except",
    "excluding",
    "exclude",
    "excludes",
    "nothing",
    "nobody",
    "cannot",
    "non",
    "free",  # equipment-free, gluten-free (a word "free" alone counts too: it fails safe)
    "outside",
}
_STOPWORDS = set(
    [
        "a",
        "an",
        "the",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "from",
        "by",
        "with",
        "and",
        "or",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "do",
        "does",
        "did",
        "i",
        "me",
        "my",
        "you",
        "your",
        "we",
        "our",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "how",
        "what",
        "which",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "please",
        "tell",
        "show",
        "give",
        "get",
        "make",
        "about",
        "as",
        "into",
        "via",
        "using",
        "use",
        "there",
        "their",
        "them",
        "they",
        "he",
        "she",
        "his",
        "her",
        "some",
        "any",
        "one",
        "just",
        "only",
        "way",
        "best",
        "good",
    ]
)
# Greetings, thanks and the words that frame a request: they change no answer, and real users
# add them freely ("Hey, ...", "... Thanks in advance."), so they are never the changed word
# of a substitution, nor a name. (They still count in how alike two wordings are.)
_FILLERS = {
    "hi",
    "hello",
    "hey",
    "thanks",
    "thank",
    "advance",
    "kindly",
    "help",
    "question",
    "quick",
    "explain",
    "know",
    "want",
    "like",
    "need",
    "wondering",
    "curious",
}
# Sets of alternatives: two queries that pick different members ask different questions.
_CONTRASTS: list[set[str]] = [
    {"ascending", "descending"},
    {"increasing", "decreasing"},
    {"first", "last"},
    {"largest", "smallest", "biggest"},
    {"highest", "lowest"},
    {"max", "min", "maximum", "minimum"},
    {"longest", "shortest"},
    {"oldest", "newest", "youngest"},
    {"earliest", "latest"},
    {"before", "after"},
    {"preceded", "succeeded", "predecessor", "successor"},
    {"read", "write"},
    {"import", "export"},
    {"encode", "decode"},
    {"encrypt", "decrypt"},
    {"compress", "decompress"},
    {"serialize", "deserialize"},
    {"add", "remove"},
    {"insert", "delete"},
    {"push", "pop"},
    {"upload", "download"},
    {"buy", "sell", "buying", "selling"},
    {"bull", "bear", "bullish", "bearish"},
    {"rise", "fall"},
    {"gain", "loss", "gains", "losses"},
    {"profit", "loss"},
    {"deposit", "withdraw", "withdrawal"},
    {"debit", "credit"},
    {"inner", "outer", "cross"},
    {"upper", "lower", "uppercase", "lowercase"},
    {"daily", "weekly", "monthly", "yearly", "annually", "annual", "quarterly"},
    {"celsius", "fahrenheit", "kelvin"},
    {"north", "south", "east", "west"},
    {"pros", "cons"},
    {"advantages", "disadvantages"},
    {"start", "end"},
    {"open", "close"},
    {"opening", "closing"},
    {"true", "false"},
    {"sync", "async", "synchronous", "asynchronous"},
    {"mean", "median"},
    {"union", "intersection"},
    {"minimize", "maximize"},
    {"enable", "disable"},
    {"install", "uninstall"},
    {"male", "female"},
    {"past", "future"},
    {"morning", "afternoon", "evening"},
    {"spring", "summer", "autumn", "winter"},
    {"hot", "cold"},
    {"odd", "even"},
    {"local", "remote"},
    {"head", "tail"},
    {"sunrise", "sunset"},
    {"accept", "accepting", "decline", "declining", "refuse", "refusing", "reject"},
    {"children", "kids", "teenagers", "teens", "adults", "beginners", "experts"},
    {"who", "when", "where", "why"},
    {"now", "tomorrow", "yesterday", "week", "weekend", "season", "month"},
    {"lonely", "sad", "angry", "anxious", "bored", "stressed"},
    {"keep", "drop"},
    {"all", "first", "every", "any"},
    {"simple", "technical"},
]
# One word for each group of words meaning "now" (so "today" and "right now" agree).
_CANONICAL = {"today": "now", "tonight": "now", "currently": "now", "current": "now"} | {
    # and the short names of a few languages and tools, so "JS" and "javascript" agree
    "js": "javascript",
    "ts": "typescript",
    "py": "python",
    "k8s": "kubernetes",
    "golang": "go",
    "postgres": "postgresql",
    "df": "dataframe",
}
_CONTRAST_OF: dict[str, set[str]] = {}
for _group in _CONTRASTS:
    for _word in _group:
        _CONTRAST_OF.setdefault(_word, set()).update(_group - {_word})
# Capitalised words that are not names.
_NOT_NAMES = {"i", "i'm", "i've", "i'd", "i'll", "ok", "okay", "pls", "eli5", "tldr"}
# A query that adds at most this many content words of its own where the other has a name
# replaced that name ("weather in Paris today" / "weather in lyon today").
_SUBSTITUTION_WORDS = 2


@dataclass(frozen=True, slots=True)
class QueryFeatures:
    """What the vetoes compare, extracted once per query (stored with each cached entry)."""

    numbers: tuple[str, ...]  # sorted, normalised
    negated: bool
    names: frozenset[str]  # lowercased words written as names
    words: frozenset[str]  # every lowercased word (canonical "now" words as "now")

    def to_wire(self) -> dict[str, object]:
        return {
            "numbers": list(self.numbers),
            "negated": self.negated,
            "names": sorted(self.names),
            "words": sorted(self.words),
        }

    @classmethod
    def from_wire(cls, raw: dict[str, object]) -> QueryFeatures:
        def strings(key: str) -> list[str]:
            value = raw.get(key, ())
            return [str(v) for v in value] if isinstance(value, list | tuple) else []

        return cls(
            tuple(strings("numbers")),
            bool(raw.get("negated", False)),
            frozenset(strings("names")),
            frozenset(strings("words")),
        )


def _normal_number(raw: str) -> str:
    text = raw.lower().replace(",", "")
    suffix = ""
    for end in ("st", "nd", "rd", "th", "k", "m", "x"):
        if text.endswith(end):
            text, suffix = text[: -len(end)], end
            break
    try:
        value = float(text)
    except ValueError:
        return raw.lower()
    if suffix in ("st", "nd", "rd", "th", "x"):
        return f"{value:g}{suffix}"
    if suffix == "k":
        value = value * 1000
    elif suffix == "m":
        value = value * 1_000_000
    return f"{value:g}" if value != int(value) else str(int(value))


def features(text: str) -> QueryFeatures:
    numbers = [_normal_number(m.group(0)) for m in _NUMBER.finditer(text)]
    words: set[str] = set()
    names: set[str] = set()
    negated = False
    sentence_start = True
    for match in _WORD.finditer(text):
        raw = match.group(0).rstrip("'")
        word = raw.lower()
        if word.endswith("'s"):
            word, raw = word[:-2], raw[:-2]
        if not word:
            continue
        word = _CANONICAL.get(word, word)
        words.add(word)
        if word in _NUMBER_WORDS:
            numbers.append(_NUMBER_WORDS[word])
        if word in _NEGATIONS or word.endswith("n't"):
            negated = True
        plain = word in _NOT_NAMES or word in _STOPWORDS or word in _FILLERS
        if not plain and _looks_like_name(raw, sentence_start):
            names.add(word)
        sentence_start = bool(re.match(r"\s*[.?!:;\n]", text[match.end() :]))
    return QueryFeatures(tuple(sorted(numbers)), negated, frozenset(names), frozenset(words))


def _looks_like_name(raw: str, sentence_start: bool) -> bool:
    if any(c.isdigit() for c in raw):
        return True  # GPT-4, S3, python3, B2B
    if len(raw) >= 2 and raw.isupper():
        return True  # AAPL, NASA, SQL
    if any(c.isupper() for c in raw[1:]) and any(c.islower() for c in raw):
        return True  # iPhone, JavaScript, McDonald
    return raw[0].isupper() and not sentence_start


def vetoes(a: QueryFeatures, b: QueryFeatures) -> list[Veto]:
    """Why `a` and `b` must not share an answer; empty when nothing keeps them apart."""
    found: list[Veto] = []
    if Counter(a.numbers) != Counter(b.numbers):
        found.append(Veto.NUMBERS)
    if a.negated != b.negated:
        found.append(Veto.NEGATION)
    if _name_replaced(a, b) or _name_replaced(b, a):
        found.append(Veto.ENTITIES)
    if _contrasted(a.words, b.words) or _contrasted(b.words, a.words):
        found.append(Veto.CONTRAST)
    if _substituted(a.words - _STOPWORDS, b.words - _STOPWORDS):
        found.append(Veto.SUBSTITUTION)
    return found


# Shared content words, as a share of all of them, from which two queries are "worded alike".
_ALIKE = 0.5


def _substituted(a: frozenset[str], b: frozenset[str]) -> bool:
    only_a, only_b = a - b - _FILLERS, b - a - _FILLERS
    if not only_a and not only_b:
        return False
    shared = len(a & b)
    if shared / max(len(a | b), 1) < _ALIKE:
        return False
    # Typos: a word one edit from a word of the other side is the same word.
    typos_a = {w for w in only_a if any(_one_edit(w, v) for v in only_b)}
    typos_b = {w for w in only_b if any(_one_edit(w, v) for v in a)}
    return bool(only_a - typos_a or only_b - typos_b)


def _one_edit(x: str, y: str) -> bool:
    """Equal but for one inserted, deleted, replaced or swapped letter (words of 4 or more)."""
    if min(len(x), len(y)) < 4 or abs(len(x) - len(y)) > 1:
        return False
    if len(x) == len(y):
        diff = [i for i in range(len(x)) if x[i] != y[i]]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and x[diff[0]] == y[diff[1]]
            and x[diff[1]] == y[diff[0]]
        )
    short, long = (x, y) if len(x) < len(y) else (y, x)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _name_replaced(mine: QueryFeatures, theirs: QueryFeatures) -> bool:
    """A name of mine is missing from theirs, and theirs put something in its place."""
    if not mine.names - theirs.words:
        return False
    if theirs.names - mine.words:
        return True
    added = theirs.words - mine.words - _STOPWORDS
    return len(added) <= _SUBSTITUTION_WORDS


def _contrasted(mine: frozenset[str], theirs: frozenset[str]) -> bool:
    for word in mine - theirs:
        alternatives = _CONTRAST_OF.get(word)
        if alternatives and any(o in theirs and o not in mine for o in alternatives):
            return True
    return False
