"""Batched, per-request sampling: one call turns a step's logits [B, V] into one token per row.

Per row, in order (vLLM's order):
  1. penalties: repetition (HF/vLLM, over prompt + output tokens), then frequency and presence
     (OpenAI, over output tokens);
  2. while fewer than min_tokens were generated, the tokens that would finish the request are
     masked: its stop ids, plus EOS unless ignore_eos. With ignore_eos, EOS finishes nothing and
     is left alone, as in vLLM: masking it would bend the distribution for no purpose;
  3. greedy (temperature 0: argmax, nothing below applies) or division by the temperature;
  4. top_k, then top_p over the renormalised top_k distribution (enforced within the draw,
     see `nucleus_draw`: no sort of the vocabulary anywhere);
  5. the draw: inverse CDF, one float64 uniform U per row and round (the first token whose
     cumulative probability exceeds U), a draw outside the top_p nucleus drawn again with the
     row's next uniform (`nucleus_draw`). A row still outside after DRAW_ROUNDS rounds (rare:
     each round lands inside with probability >= top_p) runs the exponential race
     argmax(probs / E), E = -log(U') ~ Exp(1) per vocabulary entry, within its nucleus.
     A seeded row's uniforms come from a CPU generator seeded by splitmix64(seed, position),
     so its token depends on (seed, position, logits) alone: not on its row, its neighbours or
     the worker process (for one torch version).
On the CPU the repetition penalty and steps 3-5 up to the race run as C passes, one a row
(kernels/cpu_sampling.py: the same arithmetic, ~4x less time at batch 32); elsewhere, or with
no C compiler, as the torch ops of sampling_logits.py.
Logprobs are those of the raw logits, before penalties and temperature, as vLLM reports them
by default. The sampler trusts its params: `SamplingParams.validate` runs at admission.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch

from duetserve.runtime.errors import InvalidTokenError, ShapeError
from duetserve.runtime.kernels.cpu_sampling import SamplingKernels, load_sampling_kernels
from duetserve.runtime.sampling_logits import (
    apply_penalties,
    mask_finishing_tokens,
    mask_outside_top_k,
    nucleus_draw,
    nucleus_race,
    sampling_probs,
)
from duetserve.runtime.sampling_params import (
    MAX_LOGPROBS,
    FinishReason,
    SamplingParams,
    SamplingParamsError,
    SequenceSamplingState,
    finish_reason,
)

__all__ = [
    "MAX_LOGPROBS",
    "FinishReason",
    "SampledToken",
    "Sampler",
    "SamplingParams",
    "SamplingParamsError",
    "SequenceSamplingState",
    "TokenLogprob",
    "draw_seed",
    "finish_reason",
]

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_SMALLEST_UNIFORM = torch.finfo(torch.float32).tiny
DRAW_ROUNDS = 4  # inverse-CDF rounds before the race: a top_p 0.9 row needs it 1 time in 10^4
_RACE_STREAM = 0x5BD1E995  # a seeded row's race noise: a stream apart from its draw uniforms


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float


class SampledToken(NamedTuple):
    token_id: int
    logprob: TokenLogprob | None  # the chosen token's, when the row asked for logprobs
    top_logprobs: tuple[TokenLogprob, ...]  # top-N of the raw distribution, most likely first


class Sampler:
    """Turns a step's logits into one SampledToken per row. Holds nothing per request: every
    request's state comes in with its row. Unseeded rows draw from this sampler's generator."""

    def __init__(
        self,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        seed: int = 0,
        *,
        cpu_kernels: bool = True,
    ) -> None:
        outside = sorted(t for t in eos_token_ids if not 0 <= t < vocab_size)
        if outside:
            raise InvalidTokenError(f"EOS token ids {outside} outside vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seeded_generator = torch.Generator()  # reseeded for every seeded row
        # The C passes for CPU scores (kernels/cpu_sampling.py); None: torch everywhere.
        self._kernels = load_sampling_kernels() if cpu_kernels else None

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SequenceSamplingState]
    ) -> list[SampledToken]:
        """One token per row of logits [B, V] (any float dtype, left untouched)."""
        self._check_logits(logits, rows)
        if not rows:
            return []
        scores = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        kernels = self._kernels if scores.device.type == "cpu" else None
        apply_penalties(scores, rows, kernels)
        mask_finishing_tokens(scores, rows, self.eos_token_ids)
        token_ids = self._choose(scores, rows, kernels)  # [B] int64
        return _package(logits, token_ids, rows)

    def _check_logits(self, logits: torch.Tensor, rows: Sequence[SequenceSamplingState]) -> None:
        expected = (len(rows), self.vocab_size)
        if logits.dim() != 2 or tuple(logits.shape) != expected:
            raise ShapeError(f"logits of shape {tuple(logits.shape)}, expected {list(expected)}")
        if not logits.is_floating_point():
            raise ShapeError(f"logits of dtype {logits.dtype}, expected a float dtype")

    def _choose(
        self,
        scores: torch.Tensor,
        rows: Sequence[SequenceSamplingState],
        kernels: SamplingKernels | None,
    ) -> torch.Tensor:
        """Argmax for greedy rows; inverse-CDF draws for the others (the race for the rare row
        they leave outside its nucleus). Consumes `scores`."""
        drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
        everyone = len(drawn) == len(rows)
        token_ids = torch.empty_like(scores[:, 0], dtype=torch.int64)
        if not everyone:
            token_ids = scores.argmax(dim=-1)  # [B], the greedy rows' answer
        if not drawn:
            return token_ids
        index = torch.tensor(drawn, device=scores.device)
        drawn_rows = [rows[i] for i in drawn]
        top_p = [row.params.top_p for row in drawn_rows]
        uniforms = self._uniforms(drawn_rows, (DRAW_ROUNDS,), torch.float64, 0, scores.device)
        winners, unsettled, probs = _draw(
            scores if everyone else scores[index], drawn_rows, uniforms, top_p, kernels
        )
        if unsettled:
            racing = [drawn_rows[i] for i in unsettled]
            noise = self._uniforms(
                racing, (self.vocab_size,), torch.float32, _RACE_STREAM, scores.device
            )
            noise = noise.clamp_min_(_SMALLEST_UNIFORM).log_().neg_()
            winners[unsettled] = nucleus_race(
                probs[unsettled], noise, [top_p[i] for i in unsettled]
            )
        token_ids[index] = winners
        return token_ids

    def _uniforms(
        self,
        rows: Sequence[SequenceSamplingState],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        stream: int,
        device: torch.device,
    ) -> torch.Tensor:
        """U in [0, 1), [R, *shape]: a seeded row's from a generator seeded by its (seed,
        position) and `stream` alone, the other rows' from this sampler's generator."""
        uniform = torch.empty(len(rows), *shape, dtype=dtype, device=device)
        unseeded = [i for i, row in enumerate(rows) if row.params.seed is None]
        generator = self._generator(device)
        if len(unseeded) == len(rows):
            return uniform.uniform_(generator=generator)
        if unseeded:
            full_shape = (len(unseeded), *shape)
            uniform[unseeded] = torch.rand(
                full_shape, generator=generator, dtype=dtype, device=device
            )
        seeded = [(i, row.params.seed, row.position) for i, row in enumerate(rows)]
        draws = [(i, seed, position) for i, seed, position in seeded if seed is not None]
        if draws:
            uniform[[i for i, _, _ in draws]] = self._seeded_uniform(
                draws, shape, dtype, stream
            ).to(device)
        return uniform

    def _seeded_uniform(
        self,
        draws: list[tuple[int, int, int]],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        stream: int,
    ) -> torch.Tensor:
        """U [S, *shape] on the CPU, row s from a generator seeded by draw_seed(seed, position)
        and `stream` only."""
        uniform = torch.empty(len(draws), *shape, dtype=dtype)
        for row_uniform, (_, seed, position) in zip(uniform, draws, strict=True):
            self._seeded_generator.manual_seed(draw_seed(seed, position) ^ stream)
            row_uniform.uniform_(generator=self._seeded_generator)
        return uniform

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return self._generators[device]


def _draw(
    scores: torch.Tensor,
    rows: Sequence[SequenceSamplingState],
    uniforms: torch.Tensor,
    top_p: list[float],
    kernels: SamplingKernels | None,
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """(winners [R], the rows no round settled, probs [R, V] valid for those rows) of the
    inverse-CDF rounds over scores [R, V] of drawn rows: by the C kernels when given them (CPU
    scores), else in torch. Consumes `scores`."""
    params = [row.params for row in rows]
    if kernels is None:
        probs = sampling_probs(scores, params)  # [R, V]
        return (*nucleus_draw(probs, uniforms, top_p), probs)
    temperatures = [p.temperature for p in params]
    if any(p.top_k is not None for p in params):
        # top_k is chosen on the tempered scores, as in the torch path; the kernel then
        # divides by 1, which changes nothing.
        scores.div_(torch.tensor(temperatures)[:, None])
        mask_outside_top_k(scores, params)
        temperatures = [1.0] * len(params)
    winners, unsettled = kernels.draw(scores, temperatures, top_p, uniforms)
    return winners, unsettled, scores


def draw_seed(seed: int, position: int) -> int:
    """The generator seed for the draw at `position` of a request seeded with `seed`: splitmix64
    of both, folded to 32 bits because torch's CPU generator (mt19937) keeps only the low 32 bits
    of a seed. Two (seed, position) pairs therefore share their noise with probability 2**-32."""
    mixed = _splitmix64(_splitmix64(seed) ^ position)
    return (mixed ^ (mixed >> 32)) & _MASK32


def _splitmix64(value: int) -> int:
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _package(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SequenceSamplingState]
) -> list[SampledToken]:
    """SampledTokens with raw-logit logprobs for the rows that asked for them."""
    chosen = token_ids.tolist()
    asked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    reported = dict(zip(asked, _raw_logprobs(logits, token_ids, rows, asked), strict=True))
    tokens = []
    for i, token_id in enumerate(chosen):
        logprob, top = reported.get(i, (None, ()))
        tokens.append(SampledToken(token_id, logprob, top))
    return tokens


def _raw_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    rows: Sequence[SequenceSamplingState],
    asked: list[int],
) -> list[tuple[TokenLogprob, tuple[TokenLogprob, ...]]]:
    """(chosen token's logprob, top-N logprobs descending) of log_softmax(raw logits) per row."""
    if not asked:
        return []
    index = torch.tensor(asked, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)  # [A, V]
    chosen_ids = token_ids[index]
    chosen = logprobs.gather(1, chosen_ids[:, None])[:, 0].tolist()
    top_n = [rows[i].params.logprobs or 0 for i in asked]
    width = min(max(top_n), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(width, dim=-1)  # [A, N], sorted descending
    values, ids = top_values.tolist(), top_ids.tolist()
    reported = []
    for a, (token_id, n) in enumerate(zip(chosen_ids.tolist(), top_n, strict=True)):
        top = tuple(TokenLogprob(t, v) for t, v in zip(ids[a][:n], values[a][:n], strict=True))
        reported.append((TokenLogprob(token_id, chosen[a]), top))
    return reported
