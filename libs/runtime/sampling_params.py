"""What a request asks of the sampler, and when its generation ends.

`SamplingParams` is the per-request contract (validated once, at admission); `finish_reason`
decides, after each new token, whether the request is done. The sampler itself lives in
`sampling.py` and never validates: it trusts params that passed `validate`.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from duetserve.runtime.errors import RuntimeInputError

MAX_LOGPROBS = 20
MIN_PENALTY, MAX_PENALTY = -2.0, 2.0
SEED_LIMIT = 1 << 63


# Below this a temperature samples the argmax (as vLLM's _SAMPLING_EPS): the second-best
# token would need a score within about 1e-5 x 88 of the best to be drawn at all.
GREEDY_BELOW_TEMPERATURE = 1e-5


class SamplingParamsError(RuntimeInputError):
    """Sampling parameters outside their allowed range; the message names the field."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0  # (0, 1]: keep the smallest set of tokens whose mass reaches top_p
    top_k: int | None = None  # None = off; else >= 1
    repetition_penalty: float = 1.0  # > 0; HF/vLLM semantics over prompt + output tokens
    frequency_penalty: float = 0.0  # [-2, 2]; OpenAI semantics over output tokens
    presence_penalty: float = 0.0  # [-2, 2]; OpenAI semantics over output tokens
    min_tokens: int = 0  # tokens that would finish the request are masked until this many
    ignore_eos: bool = False  # EOS does not end the request (stop_token_ids still do)
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None = off; N = chosen token's logprob plus top-N alternatives
    seed: int | None = None  # None = the sampler's own generator

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small the draw is the argmax anyway (scores over it
        would overflow float32: 1e-300 made every score infinite and softmax NaN)."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self, vocab_size: int) -> None:
        """Raise SamplingParamsError naming the first field outside its allowed range."""
        _check_int("max_tokens", self.max_tokens, 1, None)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _check_float("temperature", self.temperature, ">= 0", lambda v: v >= 0.0)
        _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1, None)
        _check_float("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0.0)
        in_range = f"in [{MIN_PENALTY:g}, {MAX_PENALTY:g}]"
        _check_float("frequency_penalty", self.frequency_penalty, in_range, _is_penalty)
        _check_float("presence_penalty", self.presence_penalty, in_range, _is_penalty)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, 0, vocab_size - 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_LIMIT - 1)


@dataclass(slots=True)
class SequenceSamplingState:
    """One batch row, owned by the caller. The token being sampled is output number
    len(output_token_ids), at position len(prompt_token_ids) + len(output_token_ids)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]

    @property
    def position(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


def finishing_token_ids(params: SamplingParams, eos_token_ids: frozenset[int]) -> frozenset[int]:
    """The token ids that end this request: its stop ids, plus EOS unless ignore_eos."""
    stop_ids = frozenset(params.stop_token_ids)
    return stop_ids if params.ignore_eos else stop_ids | eos_token_ids


def finish_reason(
    params: SamplingParams, eos_token_ids: frozenset[int], output_token_ids: Sequence[int]
) -> FinishReason | None:
    """Why the request ends now that its newest token is appended, or None if it goes on.

    A finishing token (stop id, or EOS unless ignore_eos) counts only once min_tokens were
    generated; it takes precedence over LENGTH when both hold on the same token.
    """
    num_generated = len(output_token_ids)
    if num_generated == 0:
        return None
    if num_generated >= params.min_tokens and output_token_ids[-1] in finishing_token_ids(
        params, eos_token_ids
    ):
        return FinishReason.STOP
    if num_generated >= params.max_tokens:
        return FinishReason.LENGTH
    return None


def _is_penalty(value: float) -> bool:
    return MIN_PENALTY <= value <= MAX_PENALTY


def _check_int(field: str, value: object, low: int, high: int | None) -> None:
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(f"{field} must be an integer {allowed} (got {value!r})")
    if value < low or (high is not None and value > high):
        raise SamplingParamsError(f"{field} must be {allowed} (got {value})")


def _check_float(field: str, value: object, allowed: str, ok: Callable[[float], bool]) -> None:
    number = None if isinstance(value, bool) or not isinstance(value, int | float) else value
    if number is None or not math.isfinite(number) or not ok(float(number)):
        raise SamplingParamsError(f"{field} must be a finite number {allowed} (got {value!r})")
