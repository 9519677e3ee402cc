"""Deterministic, real-looking prompt text for synthetic workloads.

Text is English-like sentences drawn from a fixed word list. It is built from paragraphs that
depend only on (key, paragraph number), so `passage(key, k)` is always a prefix of
`passage(key, k + 1)`: asking for a longer prompt never changes the words already chosen, and
the words never depend on which tokenizer measured them.

Without a tokenizer, a prompt's size is estimated by `estimate_tokens`: one token per word and
one per punctuation mark (close to a BPE tokenizer on plain English made of common words; pass
the real tokenizer's counter wherever a function takes `count_tokens`)."""

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

CountTokens = Callable[[str], int]


def token_counter(model_dir: str | Path) -> CountTokens:
    """Prompt tokens as the model directory's tokenizer counts them (no special tokens)."""
    from duetserve.runtime.tokenizer import Tokenizer  # no torch: cheap to import

    tokenizer = Tokenizer.from_dir(Path(model_dir))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


_WORD_LIST = (
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "they which one you were all we their there can has more when been will would who so "
    "about if some out them time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very "
    "make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came "
    "right used take three system program data memory model server request answer question "
    "value number table river mountain city garden kitchen window market music history "
    "science engine signal network paper letter story evening morning winter summer water "
    "light stone forest bridge island harbor village teacher student doctor farmer painter "
    "careful quiet simple bright early modern public useful common recent small large "
    "quickly slowly often rarely together always perhaps nearly clearly brings keeps shows "
    "builds follows opens moves holds reads writes carries finds gives leaves turns grows"
)
WORDS = tuple(_WORD_LIST.split())
PARAGRAPH_SENTENCES = (3, 8)  # sentences per paragraph, drawn uniformly (inclusive)
SENTENCE_WORDS = (5, 18)  # words per sentence, drawn uniformly (inclusive)
COMMA_PROBABILITY = 0.35  # chance that a sentence has one comma after one of its words
_TOKEN = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """Words plus punctuation marks: the default token count where no tokenizer is given."""
    return len(_TOKEN.findall(text))


@lru_cache(maxsize=4096)
def _paragraph(key: tuple[int, ...], number: int) -> tuple[str, ...]:
    """The pieces (words and punctuation marks) of one paragraph."""
    rng = np.random.default_rng([*key, number])
    pieces: list[str] = []
    for _ in range(int(rng.integers(PARAGRAPH_SENTENCES[0], PARAGRAPH_SENTENCES[1] + 1))):
        length = int(rng.integers(SENTENCE_WORDS[0], SENTENCE_WORDS[1] + 1))
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=length)]
        words[0] = words[0].capitalize()
        comma_after = int(rng.integers(1, length - 1)) if rng.random() < COMMA_PROBABILITY else -1
        for position, word in enumerate(words):
            pieces.append(word)
            if position == comma_after:
                pieces.append(",")
        pieces.append(".")
    return tuple(pieces)


def _join(pieces: Sequence[str]) -> str:
    out: list[str] = []
    for piece in pieces:
        if out and piece not in ",.":
            out.append(" ")
        out.append(piece)
    return "".join(out)


def passage(key: Sequence[int], pieces: int) -> str:
    """Exactly `pieces` words and punctuation marks of the text named by `key` (so that
    `estimate_tokens(passage(key, k)) == k`), ending with a full stop."""
    chosen: list[str] = []
    number = 0
    while len(chosen) < pieces:
        chosen.extend(_paragraph(tuple(key), number))
        number += 1
    chosen = chosen[:pieces]
    if len(chosen) > 1 and chosen[-1] != ".":
        chosen[-1] = "."  # cut mid-sentence: end it there
        if chosen[-2] == ",":
            chosen[-2] = "too"
    return _join(chosen)


def sized_passage(
    key: Sequence[int], tokens: int, count_tokens: CountTokens | None = None
) -> tuple[str, int]:
    """A passage of about `tokens` tokens and its measured size. With a real tokenizer the
    number of pieces is corrected (a few proportional steps) until the count is as close to the
    target as the steps get; the closest one is kept."""
    count = count_tokens or estimate_tokens
    pieces = max(1, tokens)
    best_text = passage(key, pieces)
    best_count = count(best_text)
    for _ in range(3):
        if best_count == tokens or best_count == 0:
            break
        pieces = max(1, round(pieces * tokens / best_count))
        text = passage(key, pieces)
        measured = count(text)
        if abs(measured - tokens) >= abs(best_count - tokens):
            break
        best_text, best_count = text, measured
    return best_text, best_count


PARAPHRASES = (
    (
        "Explain how {t} works.",
        "Can you describe the way {t} works?",
        "How does {t} work? Please walk me through it.",
    ),
    (
        "What are the main advantages of {t}?",
        "List the key benefits of {t}.",
        "Why would someone choose {t}? Name its biggest strengths.",
    ),
    (
        "Give me a short summary of {t}.",
        "Summarize {t} briefly.",
        "In a few sentences, what is {t}?",
    ),
    (
        "What mistakes do people commonly make with {t}?",
        "Which errors are typical when people deal with {t}?",
        "Where do most people go wrong with {t}?",
    ),
    (
        "How should a beginner get started with {t}?",
        "What is the best way for a newcomer to learn about {t}?",
        "I know nothing about {t}. Where do I start?",
    ),
    (
        "Compare {t} with its main alternatives.",
        "How does {t} stack up against the alternatives?",
        "What are the alternatives to {t}, and how do they differ from it?",
    ),
)
TOPICS = (
    "photosynthesis",
    "a hash table",
    "the TCP handshake",
    "compound interest",
    "vaccination",
    "binary search",
    "a solar panel",
    "inflation",
    "the water cycle",
    "public key cryptography",
    "a sourdough starter",
    "garbage collection",
    "plate tectonics",
    "a neural network",
    "the French Revolution",
    "composting",
    "a fixed-rate mortgage",
    "a black hole",
    "version control with git",
    "container shipping",
    "the immune system",
    "an electric car",
    "a pension plan",
    "a wind turbine",
    "the stock market",
    "the sleep cycle",
    "a compiler",
    "a coral reef",
    "the printing press",
    "a noise-cancelling headset",
)
