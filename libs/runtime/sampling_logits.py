"""The tensor steps of sampling: penalties, min_tokens masking, temperature, top_k, and the
race that draws inside the top_p nucleus. Each works on a whole batch of float32 scores [B, V]
at once, and each row's result depends on that row alone.

Nothing here sorts the vocabulary (sorting 64 x 16k floats takes ~30 ms on two CPU cores):
top_k reads the k best scores with `topk`, and top_p is enforced by rerunning the race, which
touches the vocabulary a couple of times instead of sorting it.
"""

import itertools
import math
from collections.abc import Sequence

import torch

from duetserve.runtime.errors import InvalidTokenError
from duetserve.runtime.sampling_params import (
    SamplingParams,
    SequenceSamplingState,
    finishing_token_ids,
)


def apply_penalties(scores: torch.Tensor, rows: Sequence[SequenceSamplingState]) -> None:
    """In place on contiguous float32 scores [B, V]: the repetition penalty, then frequency and
    presence penalties. Costs O(tokens of the penalised rows), not O(B * V)."""
    if any(row.params.repetition_penalty != 1.0 for row in rows):
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
    flat = torch.unique(_flat_indices(scores, seen))  # [N], row * V + token
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
    lengths = torch.tensor([len(tokens) for _, tokens in token_lists])
    row_ids = torch.tensor([i for i, _ in token_lists]).repeat_interleave(lengths)
    flat = itertools.chain.from_iterable(tokens for _, tokens in token_lists)
    token_ids = torch.tensor(list(flat), dtype=torch.int64)
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
    infinite = scores == math.inf
    if bool(infinite.any()):
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
        winner_probs = racing_probs.gather(1, racing_winners[:, None])  # [P, 1]
        more_likely = racing_probs > winner_probs  # [P, V]
        mass_above = racing_probs.mul(more_likely).sum(dim=-1)  # [P]
        # The most likely tokens (nothing above them) are always in, whatever top_p: one too
        # small for float32 (5e-324) is 0 here, and the race would never end.
        outside = (mass_above >= limits) & (mass_above > 0)
        rows, limits, racing_probs = rows[outside], limits[outside], racing_probs[outside]
        # Keys drop to 0 outside the field; inside, the most likely token keeps a key > 0.
        racing_keys = racing_keys[outside].mul_(more_likely[outside])
        racing_winners = racing_keys.argmax(dim=-1)
        winners[rows] = racing_winners
    return winners
