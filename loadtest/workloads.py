"""Workloads: lists of `RequestSpec`, deterministic from a seed, all arriving at 0 until
`assign_arrivals` spreads them out.

Prompt text is real-looking English from `text.py`. `prompt_tokens` is measured with
`count_tokens` when given (pass the served model's tokenizer for exact numbers), else estimated
(words + punctuation). For chat workloads it counts the messages' contents only: the server's
chat template adds its own tokens on top. Lengths come from these distributions:

- `sharegpt_like`: prompt log-normal, median 200, σ 1.0, in [4, 1024];
  output log-normal, median 200, σ 0.9, in [4, 1024].
- `long_prompt` (LongBench-like): prompt uniform in [1536, 4096]; output uniform in [16, 128].
- `math_like`: prompt log-normal, median 80, σ 0.5, in [16, 256];
  output log-normal, median 700, σ 0.5, in [256, 2048].

Log-normal lengths outside their range are drawn again (a truncated log-normal, as ShareGPT's
own lengths are filtered rather than capped), which pulls the median a little under its
nominal value (about 190 for `sharegpt_like`'s prompts).

These three take `max_context`, the served model's context in tokens: a request's prompt is
then cut so that its measured `prompt_tokens` + `output_tokens` + `CHAT_TEMPLATE_MARGIN` fit in
it (the margin is for what the server adds around the prompt: BOS, a chat template). The
lengths are drawn as without it and clipped, not drawn again, so the same seed gives the same
requests wherever they fit; an answer is cut only where it would leave the prompt no room. The
other workloads' sizes are given, not drawn: `over_context` lists the requests that do not fit.
The cap holds for the counts `count_tokens` makes: with estimated counts the server's may
differ (by about +25% on `small`'s tokenizer)."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from duetserve.loadtest.arrivals import TraceEntry
from duetserve.loadtest.sharegpt import sharegpt
from duetserve.loadtest.spec import RequestSpec, SloSpec
from duetserve.loadtest.text import PARAPHRASES, TOPICS, CountTokens, estimate_tokens, sized_passage

__all__ = [
    "assign_arrivals",
    "compound_groups",
    "fixed",
    "long_prompt",
    "math_like",
    "multi_turn",
    "over_context",
    "paraphrase_pairs",
    "replay",
    "shared_prefix",
    "sharegpt",
    "sharegpt_like",
    "with_slo",
]


class LogNormal(NamedTuple):
    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            values = np.rint(rng.lognormal(np.log(self.median), self.sigma, size=n))
            out.extend(int(v) for v in values if self.low <= v <= self.high)
        return out[:n]


class Uniform(NamedTuple):
    low: int
    high: int  # inclusive

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(v) for v in rng.integers(self.low, self.high + 1, size=n)]


SHAREGPT_PROMPT = LogNormal(median=200, sigma=1.0, low=4, high=1024)
SHAREGPT_OUTPUT = LogNormal(median=200, sigma=0.9, low=4, high=1024)
LONG_PROMPT = Uniform(1536, 4096)
LONG_OUTPUT = Uniform(16, 128)
MATH_PROMPT = LogNormal(median=80, sigma=0.5, low=16, high=256)
MATH_OUTPUT = LogNormal(median=700, sigma=0.5, low=256, high=2048)
LONG_HEAD = "Read the document below, then answer the question after it.\n\n"
LONG_TAIL = "\n\nQuestion: what is the main point of this document? Answer in one sentence."
MATH_HEAD = "Solve the problem below step by step, then state the final answer.\n\n"
CHAT_TEMPLATE_MARGIN = 64  # tokens kept free under max_context for BOS and a chat template
MIN_BODY_TOKENS = 8  # under max_context: the least passage a prompt keeps between head and tail
# Text streams: one per workload, so that equal seeds in two workloads give different text.
_SHAREGPT, _LONG, _MATH, _FIXED, _SYSTEM, _QUESTION, _TURN, _PAIRS, _REPLAY = range(9)


def _prompt(
    key: Sequence[int], tokens: int, count: CountTokens, head: str = "", tail: str = ""
) -> tuple[str, int]:
    """A prompt of about `tokens` tokens: `head`, a passage, `tail`; and its measured size."""
    frame = count(head + tail) if head or tail else 0
    body, _ = sized_passage(key, max(1, tokens - frame), count)
    text = head + body + tail
    return text, count(text)


def _fitted_prompt(
    key: Sequence[int],
    tokens: int,
    output: int,
    max_context: int,
    count: CountTokens,
    head: str,
    tail: str,
) -> tuple[str, int, int]:
    """`_prompt`'s text and size, and the answer's size, cut so that prompt + answer +
    `CHAT_TEMPLATE_MARGIN` ≤ `max_context`: the prompt first, the answer only where it would
    leave the prompt less than its head, tail and `MIN_BODY_TOKENS`."""
    budget = max_context - CHAT_TEMPLATE_MARGIN
    frame = count(head + tail) if head or tail else 0
    output = min(output, budget - frame - MIN_BODY_TOKENS)
    if output < 1:
        raise ValueError(f"a context of {max_context} tokens leaves no room for a request")
    room = budget - output  # the most prompt tokens this answer leaves
    target = min(tokens, room)
    text, measured = _prompt(key, target, count, head, tail)
    while measured > room and target > 1:  # the counter measured over the passage's target
        target = max(1, target - (measured - room))
        text, measured = _prompt(key, target, count, head, tail)
    if measured > room:
        raise ValueError(f"no prompt fits {room} tokens under a context of {max_context}")
    return text, measured, output


def _single_prompts(
    stream: int,
    prompt_lengths: Sequence[int],
    output_lengths: Sequence[int],
    seed: int,
    count_tokens: CountTokens | None,
    frame: Callable[[np.random.Generator], tuple[str, str]] | None = None,
    max_context: int | None = None,
) -> list[RequestSpec]:
    count = count_tokens or estimate_tokens
    specs = []
    for index, (tokens, output) in enumerate(zip(prompt_lengths, output_lengths, strict=True)):
        key = (seed, stream, index)
        head, tail = frame(np.random.default_rng(key)) if frame else ("", "")
        if max_context is None:
            text, measured = _prompt(key, tokens, count, head, tail)
        else:
            text, measured, output = _fitted_prompt(
                key, tokens, output, max_context, count, head, tail
            )
        specs.append(RequestSpec(index, text, measured, output, 0.0))
    return specs


def sharegpt_like(
    n: int,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    max_context: int | None = None,
) -> list[RequestSpec]:
    """Chat-like lengths close to ShareGPT's (distributions in the module docstring)."""
    rng = np.random.default_rng([seed, _SHAREGPT])
    prompts, outputs = SHAREGPT_PROMPT.draw(rng, n), SHAREGPT_OUTPUT.draw(rng, n)
    return _single_prompts(_SHAREGPT, prompts, outputs, seed, count_tokens, max_context=max_context)


def long_prompt(
    n: int,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    max_context: int | None = None,
) -> list[RequestSpec]:
    """LongBench-like: a long document and a question about it, a short answer."""
    rng = np.random.default_rng([seed, _LONG])
    prompts, outputs = LONG_PROMPT.draw(rng, n), LONG_OUTPUT.draw(rng, n)
    return _single_prompts(_LONG, prompts, outputs, seed, count_tokens, _long_frame, max_context)


def _long_frame(_: np.random.Generator) -> tuple[str, str]:
    return LONG_HEAD, LONG_TAIL


def _math_frame(rng: np.random.Generator) -> tuple[str, str]:
    a, b, c = (int(v) for v in rng.integers(2, 999, size=3))
    return MATH_HEAD, f" If a = {a}, b = {b} and c = {c}, what is a × b − c, and why?"


def math_like(
    n: int,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    max_context: int | None = None,
) -> list[RequestSpec]:
    """Short problems with long, reasoning-style answers."""
    rng = np.random.default_rng([seed, _MATH])
    prompts, outputs = MATH_PROMPT.draw(rng, n), MATH_OUTPUT.draw(rng, n)
    return _single_prompts(_MATH, prompts, outputs, seed, count_tokens, _math_frame, max_context)


def fixed(
    n: int,
    prompt_tokens: int,
    output_tokens: int,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
) -> list[RequestSpec]:
    """`n` requests of one size (e.g. the 128/64 burst); every prompt is different text."""
    return _single_prompts(_FIXED, [prompt_tokens] * n, [output_tokens] * n, seed, count_tokens)


def _chat_tokens(messages: Sequence[Mapping[str, str]], count: CountTokens) -> int:
    return sum(count(message["content"]) for message in messages)


def shared_prefix(
    n_systems: int,
    m_questions: int,
    system_tokens: int = 1024,
    question_tokens: int = 64,
    output_tokens: int = 128,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
) -> list[RequestSpec]:
    """`n_systems` system prompts × `m_questions` questions each, as chat messages
    `[system, user]`. Requests go round-robin over the systems (question 0 of every system,
    then question 1, ...), so a prefix cache has to hold them all to hit."""
    count = count_tokens or estimate_tokens
    systems = [sized_passage((seed, _SYSTEM, s), system_tokens, count)[0] for s in range(n_systems)]
    specs: list[RequestSpec] = []
    for question in range(m_questions):
        for system in range(n_systems):
            key = (seed, _QUESTION, system, question)
            text, _ = _prompt(key, question_tokens, count, tail=" Answer briefly?")
            messages = [
                {"role": "system", "content": systems[system]},
                {"role": "user", "content": text},
            ]
            tokens = _chat_tokens(messages, count)
            specs.append(RequestSpec(len(specs), messages, tokens, output_tokens, 0.0))
    return specs


def multi_turn(
    conversations: int,
    turns: int,
    user_tokens: int = 64,
    output_tokens: int = 128,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
) -> list[RequestSpec]:
    """`conversations` chats of `turns` turns. Turn t's messages are the t earlier user
    messages, each followed by a stand-in assistant answer of `output_tokens`, then a new user
    message: the prompt grows every turn. All turns of a chat share `conversation`, and specs
    come turn by turn (turn 0 of every chat, then turn 1, ...)."""
    count = count_tokens or estimate_tokens
    histories: list[list[dict[str, str]]] = [[] for _ in range(conversations)]
    specs: list[RequestSpec] = []
    for turn in range(turns):
        for chat, history in enumerate(histories):
            user, _ = _prompt((seed, _TURN, chat, 2 * turn), user_tokens, count)
            messages = [*history, {"role": "user", "content": user}]
            tokens = _chat_tokens(messages, count)
            spec = RequestSpec(len(specs), messages, tokens, output_tokens, 0.0)
            specs.append(replace(spec, conversation=f"chat-{chat}"))
            answer, _ = _prompt((seed, _TURN, chat, 2 * turn + 1), output_tokens, count)
            history.extend([messages[-1], {"role": "assistant", "content": answer}])
    return specs


def paraphrase_pairs(
    n: int, output_tokens: int = 128, seed: int = 0, count_tokens: CountTokens | None = None
) -> list[RequestSpec]:
    """`n` pairs of prompts that ask the same thing in different words, for the semantic
    cache: specs 2k and 2k + 1 are a pair. Pairs cycle over every (question, topic) before
    any repeats."""
    count = count_tokens or estimate_tokens
    rng = np.random.default_rng([seed, _PAIRS])
    combos = [(q, t) for q in range(len(PARAPHRASES)) for t in range(len(TOPICS))]
    order: list[int] = []
    while len(order) < n:
        order.extend(int(i) for i in rng.permutation(len(combos)))
    specs: list[RequestSpec] = []
    for combo in order[:n]:
        question, topic = combos[combo]
        for wording in rng.choice(len(PARAPHRASES[question]), size=2, replace=False):
            text = PARAPHRASES[question][int(wording)].format(t=TOPICS[topic])
            specs.append(RequestSpec(len(specs), text, count(text), output_tokens, 0.0))
    return specs


def replay(
    entries: Sequence[TraceEntry],
    slo_classes: Mapping[str, SloSpec] | None = None,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
) -> list[RequestSpec]:
    """A trace's requests (`arrivals.from_trace`) with text of their sizes, their arrivals,
    and the SLO their class names in `slo_classes` (an unknown class is an error)."""
    classes = slo_classes or {}
    unknown = {e.slo_class for e in entries if e.slo_class is not None} - classes.keys()
    if unknown:
        raise KeyError(f"SLO classes not given an SloSpec: {sorted(unknown)}")
    prompts = [e.prompt_tokens for e in entries]
    outputs = [e.output_tokens for e in entries]
    specs = _single_prompts(_REPLAY, prompts, outputs, seed, count_tokens)
    return [
        replace(
            spec, arrival_s=e.arrival_s, slo=None if e.slo_class is None else classes[e.slo_class]
        )
        for spec, e in zip(specs, entries, strict=True)
    ]


def with_slo(
    specs: Sequence[RequestSpec], slo: SloSpec | Callable[[RequestSpec], SloSpec | None]
) -> list[RequestSpec]:
    """The specs with an SLO each: the one given, or the one a function picks for each."""
    if isinstance(slo, SloSpec):
        return [replace(spec, slo=slo) for spec in specs]
    return [replace(spec, slo=slo(spec)) for spec in specs]


def compound_groups(
    specs: Sequence[RequestSpec], size: int, deadline_ms: float, prefix: str = "group"
) -> list[RequestSpec]:
    """Consecutive runs of `size` specs made into compound groups `{prefix}-0`, ... (the last
    one may be smaller), each with one deadline from its first member's arrival and its size
    stated (so the server can judge the group when its last member finishes)."""
    if size < 1:
        raise ValueError(f"group size must be positive, got {size}")
    out = []
    for i, spec in enumerate(specs):
        first = i - i % size
        members = min(size, len(specs) - first)
        slo = SloSpec("compound", deadline_ms=deadline_ms, group=f"{prefix}-{i // size}")
        out.append(replace(spec, slo=replace(slo, group_size=members)))
    return out


def over_context(specs: Sequence[RequestSpec], max_context: int) -> list[RequestSpec]:
    """The specs whose prompt + answer + `CHAT_TEMPLATE_MARGIN` need more than `max_context`
    tokens (as the workload counted them: chat prompts count the messages' contents only)."""
    return [
        spec
        for spec in specs
        if spec.prompt_tokens + spec.output_tokens + CHAT_TEMPLATE_MARGIN > max_context
    ]


def assign_arrivals(specs: Sequence[RequestSpec], times: Sequence[float]) -> list[RequestSpec]:
    """Spec i arrives at times[i] (one time per spec; `arrivals.py` makes them)."""
    if len(times) != len(specs):
        raise ValueError(f"{len(specs)} specs but {len(times)} arrival times")
    return [replace(spec, arrival_s=float(t)) for spec, t in zip(specs, times, strict=True)]
