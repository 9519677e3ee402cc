"""The tensor steps of sampling: penalties, min_tokens masking, temperature, top_k, and the
draws inside the top_p nucleus. Each works on a whole batch of float32 scores [B, V] at once,
and each row's result depends on that row alone.

Nothing here sorts the vocabulary (sorting 64 x 16k floats takes ~30 ms on two CPU cores):
top_k reads the k best scores with `topk`; top_p is enforced by rejection (`nucleus_draw`:
a draw outside the nucleus is drawn again), and for the rare row still outside after a few
rounds by rerunning the race (`nucleus_race`), each of which touches the vocabulary a couple of
times instead of sorting it.
"""

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from duetserve.runtime.errors import InvalidTokenError
from duetserve.runtime.kernels.cpu_sampling import SamplingKernels
from duetserve.runtime.sampling_params import (
    SamplingParams,
    SequenceSamplingState,
    finishing_token_ids,
)

CDF_CHUNK = 256  # tokens a float32 partial sum spans in `_inverse_cdf`


def apply_penalties(
    scores: torch.Tensor,
    rows: Sequence[SequenceSamplingState],
    kernels: SamplingKernels | None = None,
) -> None:
    """In place on contiguous float32 scores [B, V]: the repetition penalty (by the C kernel
    when given one, CPU scores only), then frequency and presence penalties. Costs O(tokens of
    the penalised rows), not O(B * V)."""
    penalised = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if penalised and kernels is not None:
        kernels.repetition_penalty(
            scores,
            penalised,
            [rows[i].params.repetition_penalty for i in penalised],
            [(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in penalised],
        )
    elif penalised:
        _apply_repetition_penalty(scores, rows)
    if any(_counts_output(row.params) for row in rows):
        _apply_frequency_presence(scores, rows)


def _counts_output(params: SamplingParams) -> bool:
    return params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _apply_repetition_penalty(scores: torch.Tensor, rows: Sequence[SequenceSamplingState]) -> None:
    """HF/vLLM: over each token seen in the prompt or the output, once however often seen, a
    positive score is divided by the penalty and a negative one multiplied by it."""
    seen = [
        (i, tokens)
        for i, row in enumerate(rows)
        if row.params.repetition_penalty != 1.0
        for tokens in (row.prompt_token_ids, row.output_token_ids)
    ]
    # [N], row * V + token. A token seen twice appears twice: both copies read the score
    # before the penalty and write the same penalised value, so it is penalised once.
    flat = _flat_indices(scores, seen)
    penalty = _row_column(scores, [row.params.repetition_penalty for row in rows])
    # A penalty below what float32 holds (1e-300 > 0 is valid) is the smallest it holds: 0
    # would make a score of 0 NaN. Positive scores over it may be infinite: see sampling_probs.
    penalty = penalty.clamp_(min=torch.finfo(scores.dtype).tiny)[flat // scores.shape[1]]
    values = scores.view(-1)[flat]
    scores.view(-1)[flat] = torch.where(values < 0, values * penalty, values / penalty)


def _apply_frequency_presence(scores: torch.Tensor, rows: Sequence[SequenceSamplingState]) -> None:
    """OpenAI: over output tokens only, minus count * frequency_penalty, and minus
    presence_penalty once the token appeared at all."""
    generated = [
        (i, row.output_token_ids) for i, row in enumerate(rows) if _counts_output(row.params)
    ]
    flat, counts = torch.unique(_flat_indices(scores, generated), return_counts=True)  # [N]
    row_ids = flat // scores.shape[1]
    frequency = _row_column(scores, [row.params.frequency_penalty for row in rows])[row_ids]
    presence = _row_column(scores, [row.params.presence_penalty for row in rows])[row_ids]
    scores.view(-1)[flat] -= counts.to(scores.dtype) * frequency + presence


def _row_column(scores: torch.Tensor, values: list[float]) -> torch.Tensor:
    """One float per row, [B], on the scores' device."""
    return torch.tensor(values, dtype=scores.dtype, device=scores.device)


def _flat_indices(
    scores: torch.Tensor, token_lists: Sequence[tuple[int, Sequence[int]]]
) -> torch.Tensor:
    """row * V + token, int64 [N], for every token of every (row, tokens) pair. A token outside
    the vocabulary would land in another row, so it is refused."""
    vocab_size = scores.shape[1]
    lengths = [len(tokens) for _, tokens in token_lists]
    row_ids = torch.tensor([i for i, _ in token_lists]).repeat_interleave(torch.tensor(lengths))
    flat = itertools.chain.from_iterable(tokens for _, tokens in token_lists)
    # numpy reads the ints in C: 4x faster than torch.tensor(list) at a batch's 20k tokens.
    token_ids = torch.from_numpy(np.fromiter(flat, dtype=np.int64, count=sum(lengths)))
    if token_ids.numel() and not 0 <= int(token_ids.min()) <= int(token_ids.max()) < vocab_size:
        raise InvalidTokenError(f"a prompt or output token id outside vocabulary [0, {vocab_size})")
    return (row_ids * vocab_size + token_ids).to(scores.device)


def mask_finishing_tokens(
    scores: torch.Tensor, rows: Sequence[SequenceSamplingState], eos_token_ids: frozenset[int]
) -> None:
    """In place: -inf on every token that would finish a row still short of its min_tokens
    (its stop ids, plus EOS unless ignore_eos)."""
    coordinates = [
        (i, token_id)
        for i, row in enumerate(rows)
        if len(row.output_token_ids) < row.params.min_tokens
        for token_id in finishing_token_ids(row.params, eos_token_ids)
    ]
    if coordinates:
        row_ids, token_ids = torch.tensor(coordinates, device=scores.device).T
        scores[row_ids, token_ids] = float("-inf")


def sampling_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """softmax(scores / temperature) [R, V] over each row's top_k tokens (renormalised), for
    rows that are not greedy. top_p is left to the draw. Consumes `scores`."""
    temperatures = torch.tensor([p.temperature for p in params], device=scores.device)
    scores.div_(temperatures[:, None])
    if any(p.top_k is not None for p in params):
        mask_outside_top_k(scores, params)
    probs = scores.softmax(dim=-1)
    # A row with infinite scores (a vanishing repetition penalty) has NaN probabilities: its
    # infinite tokens share the mass, the rest get none, as the limit of the softmax does.
    if scores.numel() and float(scores.max()) == math.inf:  # one reduction, no mask, mostly
        infinite = scores == math.inf
        rows = infinite.any(dim=-1)
        share = infinite[rows].to(probs.dtype)
        probs[rows] = share / share.sum(dim=-1, keepdim=True)
    return probs


def mask_outside_top_k(scores: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """In place on scores [R, V]: -inf below the k-th largest score of each row with a top_k.
    Ties with the k-th score all stay, so the kept set does not depend on how `topk` breaks
    ties. Costs a `topk` as wide as the largest k, never a sort."""
    vocab_size, device = scores.shape[-1], scores.device
    top_k = [None if p.top_k is None else min(p.top_k, vocab_size) for p in params]
    width = max(k for k in top_k if k is not None)
    window = scores.topk(width, dim=-1).values  # [R, W], descending
    kth_index = torch.tensor([width - 1 if k is None else k - 1 for k in top_k], device=device)
    kth = window.gather(1, kth_index[:, None])  # [R, 1]
    kth.masked_fill_(torch.tensor([k is None for k in top_k], device=device)[:, None], -math.inf)
    scores.masked_fill_(scores < kth, -math.inf)


def nucleus_draw(
    probs: torch.Tensor, uniforms: torch.Tensor, top_p: Sequence[float]
) -> tuple[torch.Tensor, list[int]]:
    """Inverse-CDF draws [R] from probs [R, V] restricted to each row's top_p nucleus, and the
    rows no round settled. Round r draws token i with probability probs[i] from the row's
    uniform uniforms[:, r] (float64 in [0, 1)): the first token whose cumulative probability
    exceeds it, so a token of probability 0 is never drawn. A draw outside the nucleus (the
    tokens strictly more likely than it weigh top_p or more) is rejected and the row draws
    again with its next uniform: the accepted token is distributed as probs renormalised over
    the nucleus, as sorting would give. A round is accepted with probability at least top_p,
    so rows left after the last round are rare; the caller settles them with `nucleus_race`.

    One cumulative sum a batch and a few searches a row: R x K uniforms instead of R x V."""
    draws = _inverse_cdf(probs, uniforms)  # [R, K]
    winners = draws[:, 0].clone()
    rows = [i for i, p in enumerate(top_p) if p < 1.0]
    for round_draws in draws.T[1:]:
        if not rows:
            break
        rows = _still_outside(probs, winners, top_p, rows)
        winners[rows] = round_draws[rows]
    return winners, _still_outside(probs, winners, top_p, rows) if rows else rows


def _still_outside(
    probs: torch.Tensor, winners: torch.Tensor, top_p: Sequence[float], rows: list[int]
) -> list[int]:
    """Those of `rows` whose winner lies outside their nucleus."""
    limits = torch.tensor([top_p[i] for i in rows], dtype=probs.dtype, device=probs.device)
    outside, _ = _outside_nucleus(probs[rows], winners[rows], limits)
    return [i for i, out in zip(rows, outside.tolist(), strict=True) if out]


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids [R, K]: for each uniform u of uniforms [R, K], the first token whose cumulative
    probability exceeds u times the row's total, so a token of probability 0 is never drawn.

    The cumulative sum runs in float32 within chunks of CDF_CHUNK tokens and in float64 over the
    chunks' totals: a float32 sum over the whole vocabulary would round away the tokens below
    half an ulp of 1 (6e-8, a 49k vocabulary can hold 0.3% of its mass there), and a float64
    one costs four times the time. Within a chunk, what rounds away is relative to its mass."""
    num_rows, vocab_size = probs.shape
    pad = -vocab_size % CDF_CHUNK
    chunked = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    local = chunked.view(num_rows, -1, CDF_CHUNK).cumsum(dim=-1)  # [R, C, W] float32
    ends = local[:, :, -1].to(torch.float64).cumsum(dim=-1)  # [R, C], non-decreasing
    # u < 1 in float64 keeps u * total < total: the search stays inside the last chunk.
    targets = uniforms * ends[:, -1:]  # [R, K]
    chunks = torch.searchsorted(ends, targets, right=True).clamp_(max=ends.shape[1] - 1)
    before = ends.gather(1, (chunks - 1).clamp(min=0)).masked_fill_(chunks == 0, 0.0)
    within = local[torch.arange(num_rows, device=probs.device)[:, None], chunks].double()
    offsets = (targets - before)[..., None]  # [R, K, 1], in [0, the chunk's mass)
    position = torch.searchsorted(within, offsets, right=True)[..., 0]
    # Rounding between the two sums could put an offset at the chunk's mass: its last token of
    # nonzero probability then (the first at the chunk's full mass), never one of probability 0.
    last = torch.searchsorted(within, within[..., -1:].contiguous(), right=False)[..., 0]
    draws = chunks * CDF_CHUNK + torch.minimum(position, last)
    return draws.clamp_(max=vocab_size - 1)  # a row of NaN (nothing drawable) stays in range


def _outside_nucleus(
    probs: torch.Tensor, winners: torch.Tensor, limits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([P] bool, [P, V] bool): whether each winner is outside its row's nucleus, i.e. the
    tokens strictly more likely than it weigh its limit (top_p) or more, and which tokens those
    are. The most likely tokens (nothing above them) are always in, whatever top_p: one too
    small for float32 (5e-324) is 0 here, and the race would never end."""
    winner_probs = probs.gather(1, winners[:, None])  # [P, 1]
    more_likely = probs > winner_probs  # [P, V]
    mass_above = probs.mul(more_likely).sum(dim=-1)  # [P]
    return (mass_above >= limits) & (mass_above > 0), more_likely


def nucleus_race(probs: torch.Tensor, noise: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """The winners [R] of the exponential race argmax(probs / noise), each run among its row's
    top_p nucleus only: the most likely tokens, in order, until their mass reaches top_p (at
    least one; ties with the last one stay in). Consumes `noise`.

    No sort: a winner is inside the nucleus iff the tokens strictly more likely than it weigh
    less than top_p. A winner outside it leaves the race with every token at most as likely
    (none of them is in the nucleus), and the rows concerned run the race again on the same
    noise. The nucleus never leaves, so the last winner is the nucleus's own. Rounds are few:
    a winner falls outside with probability about 1 - top_p, and the field shrinks each time."""
    keys = noise.reciprocal_().mul_(probs)  # [R, V]; > 0 wherever probs > 0 (noise is finite)
    winners = keys.argmax(dim=-1)  # [R]
    if all(p >= 1.0 for p in top_p):
        return winners
    # Rows still racing: their ids, probs, keys, top_p and current winners. 2.0 is never reached.
    rows = torch.arange(len(top_p), device=probs.device)
    limits = torch.tensor([p if p < 1.0 else 2.0 for p in top_p], device=probs.device)
    racing_probs, racing_keys, racing_winners = probs, keys, winners
    while rows.numel():
        outside, more_likely = _outside_nucleus(racing_probs, racing_winners, limits)
        rows, limits, racing_probs = rows[outside], limits[outside], racing_probs[outside]
        # Keys drop to 0 outside the field; inside, the most likely token keeps a key > 0.
        racing_keys = racing_keys[outside].mul_(more_likely[outside])
        racing_winners = racing_keys.argmax(dim=-1)
        winners[rows] = racing_winners
    return winners
