"""Prefill and decode over reused KV (KVShare): the KV of spans cached by other prompts, placed
at their new positions, and only the tokens that matter computed again.

Prefill (`prefill_with_reuse`), for one sequence whose first `num_cached` tokens are shared in
place (an exact block-aligned prefix, as the prefix cache gives) and whose `spans` were cached
elsewhere:

1. Place: every layer's K/V of each span is copied from its source slots into the sequence's
   own slots at the span's new positions, each key turned by the position difference
   (kernels/kv_place.py). The source is only read.
2. Layers 0..check_layer run over every token after the shared prefix, as a plain prefill: the
   reused tokens' K/V there are computed fresh (a layer-0 K/V depends on the token alone, so
   these layers cost little to redo and are exact). At check_layer, before the fresh K/V are
   stored, each reused token's deviation between its placed and fresh K/V is measured
   (kernels/kv_deviation.py).
3. The layers after check_layer run only over the new tokens (those no span covers), the
   `fraction` of reused tokens that deviate most, and the last token (its logits are the
   answer's first): a scattered chunk, each row at its own position attending causally to
   the placed K/V around it. The others keep their placed K/V in those layers.

Decode (`recheck`), every few generated tokens: the reused tokens the newest token attends to
most at `check_layer` are computed again up to that layer with the sequence's own context; the
ones whose stored K/V there deviate from the fresh ones beyond `threshold` (relative squared
distance) go on through every later layer, their K/V there replaced. This is KVShare's own
stage: a token whose deviation looked small at the early check layer can still matter to what
the answer says later.

Both write only the sequence's own blocks after its shared prefix: the caller owns them.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kernels.attention_ref import gather_context
from duetserve.runtime.kernels.kv_deviation import kv_deviation, to_recompute
from duetserve.runtime.kernels.kv_place import place_kv
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.layers.rotary import inverse_frequencies
from duetserve.runtime.models.llama import LlamaForCausalLM

DEFAULT_FRACTION = 0.15
DEFAULT_CHECK_LAYER = 1


@dataclass(frozen=True, slots=True)
class ReusedSpan:
    """Tokens [start, start + len(source_slots)) of the new prompt, whose K/V lie cached at
    `source_slots`, computed there at positions source_start, source_start + 1, ..."""

    start: int
    source_slots: Sequence[int]
    source_start: int

    @property
    def end(self) -> int:
        return self.start + len(self.source_slots)


@dataclass(slots=True)
class ReusePrefill:
    logits: torch.Tensor  # float32 [V]: the next token's, after the prompt
    reused: list[int]  # positions whose K/V were placed from a span
    recomputed: list[int]  # of those, the ones computed again in every layer
    deviation: torch.Tensor  # float32 [len(reused)]: at the check layer, in `reused` order
    # Token-layers computed, against len(prompt) x num_layers for a full prefill.
    computed: int = 0

    @property
    def kept(self) -> list[int]:
        """Reused positions whose placed K/V stand in the layers after the check layer."""
        again = set(self.recomputed)
        return [p for p in self.reused if p not in again]


@dataclass(slots=True)
class Recheck:
    checked: list[int] = field(default_factory=list)  # positions computed up to the check layer
    recomputed: list[int] = field(default_factory=list)  # of those, the ones in every layer
    deviation: list[float] = field(default_factory=list)  # relative, of each checked position


def place_spans(
    model: LlamaForCausalLM,
    pool: KVPool,
    block_table: Sequence[int],
    spans: Sequence[ReusedSpan],
) -> list[int]:
    """Copy every layer's K/V of the spans into the sequence's slots at their new positions,
    keys turned to match; returns the positions placed, ascending."""
    block_size = pool.block_size
    src: list[int] = []
    dst_positions: list[int] = []
    deltas: list[int] = []
    for span in sorted(spans, key=lambda s: s.start):
        src.extend(span.source_slots)
        dst_positions.extend(range(span.start, span.end))
        deltas.extend([span.start - span.source_start] * len(span.source_slots))
    if not src:
        return []
    device = pool.device
    c = model.config
    inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling).to(device)
    src_slots = torch.tensor(src, dtype=torch.int64, device=device)
    dst_slots = _slots(dst_positions, block_table, block_size, device)
    delta = torch.tensor(deltas, dtype=torch.int64, device=device)
    for index in range(c.num_layers):
        k_cache, v_cache = pool.layer(index)
        place_kv(k_cache, v_cache, src_slots, dst_slots, delta, inv_freq)
    return dst_positions


@torch.inference_mode()
def prefill_with_reuse(
    model: LlamaForCausalLM,
    pool: KVPool,
    new_tokens: Sequence[int],
    block_table: Sequence[int],
    num_cached: int,
    spans: Sequence[ReusedSpan],
    fraction: float = DEFAULT_FRACTION,
    check_layer: int = DEFAULT_CHECK_LAYER,
    sink: int = 0,
) -> ReusePrefill:
    """Prefill the prompt's tokens after its first num_cached (already in the pool), reusing
    the spans' K/V and recomputing `fraction` of their tokens after check_layer (0: none; 1:
    every one, which equals a prefill without reuse); `sink`: the first tokens of each span are
    recomputed besides (EPIC's attention sink)."""
    length = num_cached + len(new_tokens)
    num_layers = model.config.num_layers
    _check_spans(spans, num_cached, length)
    if not 0 <= check_layer < num_layers:
        raise ValueError(f"check_layer {check_layer} outside the model's {num_layers} layers")
    reused = place_spans(model, pool, block_table, spans)
    chunk = SequenceChunk(new_tokens, num_cached, block_table)
    batch = ForwardBatch.build([chunk], model.config, pool)
    step = model.prepare(batch, pool)
    residual = model.embed(batch.input_ids)
    rows = torch.tensor([p - num_cached for p in reused], dtype=torch.int64, device=pool.device)
    slots = _slots(reused, block_table, pool.block_size, pool.device)
    found: list[torch.Tensor] = []

    def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                vc: torch.Tensor) -> None:  # fmt: skip
        found.append(kv_deviation(kc, vc, slots, k[rows].contiguous(), v[rows].contiguous()))

    for index in range(check_layer + 1):
        probe = measure if index == check_layer and reused else None
        residual = model.layer(index, residual, step, pool, probe)
    deviation = found[0].float().cpu() if found else torch.zeros(0)
    again = [reused[i] for i in to_recompute(deviation, fraction).tolist()] if reused else []
    heads = {p for span in spans for p in range(span.start, min(span.start + sink, span.end))}
    again = sorted(heads.union(again))
    computed = (length - num_cached) * (check_layer + 1)
    covered = set(reused).difference(again)
    covered.discard(length - 1)  # the last token's logits are the answer's: always computed
    selected = [p for p in range(num_cached, length) if p not in covered]
    if check_layer + 1 < num_layers:
        if covered:  # go on with the selected rows only, each at its own position
            keep = torch.tensor([p - num_cached for p in selected], device=pool.device)
            residual = residual[keep]
            picked = [new_tokens[p - num_cached] for p in selected]
            chunk = SequenceChunk.scattered(picked, selected, block_table)
            batch = ForwardBatch.build([chunk], model.config, pool)
            step = model.prepare(batch, pool)
        for index in range(check_layer + 1, num_layers):
            residual = model.layer(index, residual, step, pool)
        computed += len(selected) * (num_layers - check_layer - 1)
    logits = model.logits(residual[-1:])[0]
    return ReusePrefill(logits, reused, sorted(again), deviation, computed)


@dataclass(frozen=True, slots=True)
class RecheckSequence:
    """One sequence of a decode-stage batch: all its tokens' K/V are in the pool."""

    token_ids: Sequence[int]
    block_table: Sequence[int]
    candidates: Sequence[int]  # reused positions whose placed K/V still stand


@torch.inference_mode()
def recheck(
    model: LlamaForCausalLM,
    pool: KVPool,
    token_ids: Sequence[int],
    block_table: Sequence[int],
    candidates: Sequence[int],
    top: int,
    threshold: float,
    check_layer: int,
) -> Recheck:
    """KVShare's decode stage for one sequence (`recheck_many`)."""
    sequence = RecheckSequence(token_ids, block_table, candidates)
    return recheck_many(model, pool, [sequence], top, threshold, check_layer)[0]


@torch.inference_mode()
def recheck_many(
    model: LlamaForCausalLM,
    pool: KVPool,
    sequences: Sequence[RecheckSequence],
    top: int,
    threshold: float,
    check_layer: int,
) -> list[Recheck]:
    """KVShare's decode stage, for sequences whose K/V are all in the pool, as three batched
    passes: of each one's `candidates` (reused positions whose placed K/V still stand), the
    `top` its newest token attends to most at check_layer are recomputed up to it; those
    deviating there by more than `threshold` (|fresh - stored|^2 / |fresh|^2 over K and V) are
    recomputed in every layer."""
    num_layers = model.config.num_layers
    if not 0 <= check_layer < num_layers:
        raise ValueError(f"check_layer {check_layer} outside the model's {num_layers} layers")
    results = [Recheck() for _ in sequences]
    live = [i for i, s in enumerate(sequences) if s.candidates and top > 0]
    if not live:
        return results
    attention = _newest_attention(model, pool, [sequences[i] for i in live], check_layer)
    checked: dict[int, list[int]] = {}
    for i, weights in zip(live, attention, strict=True):
        seq = sequences[i]
        candidates = torch.tensor(list(seq.candidates), dtype=torch.int64)
        take = torch.topk(weights[candidates], min(top, len(candidates))).indices
        picked = sorted(p for p in candidates[take].tolist() if p < len(seq.token_ids) - 1)
        if picked:
            checked[i] = picked
    if not checked:
        return results
    order = list(checked)
    chunks = [_scattered(sequences[i], checked[i]) for i in order]
    batch = ForwardBatch.build(chunks, model.config, pool)
    step = model.prepare(batch, pool)
    slots = torch.cat(
        [_slots(checked[i], sequences[i].block_table, pool.block_size, pool.device) for i in order]
    )
    found: list[torch.Tensor] = []

    def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                vc: torch.Tensor) -> None:  # fmt: skip
        distance = kv_deviation(kc, vc, slots, k.contiguous(), v.contiguous()).float()
        size = k.float().square().sum((1, 2)) + v.float().square().sum((1, 2))
        found.append((distance / size.clamp_min(1e-12)).cpu())

    residual = model.embed(batch.input_ids)
    for index in range(check_layer + 1):
        probe = measure if index == check_layer else None
        residual = model.layer(index, residual, step, pool, probe)
    relative = found[0].tolist()
    rows: list[int] = []  # of the stale tokens, in the batch's rows
    stale: dict[int, list[int]] = {}
    at = 0
    for i in order:
        positions = checked[i]
        mine = relative[at : at + len(positions)]
        result = results[i]
        result.checked, result.deviation = positions, mine
        result.recomputed = [p for p, d in zip(positions, mine, strict=True) if d > threshold]
        rows.extend(at + j for j, d in enumerate(mine) if d > threshold)
        if result.recomputed:
            stale[i] = result.recomputed
        at += len(positions)
    if stale and check_layer + 1 < num_layers:
        residual = residual[torch.tensor(rows, device=pool.device)]
        chunks = [_scattered(sequences[i], stale[i]) for i in stale]
        batch = ForwardBatch.build(chunks, model.config, pool)
        step = model.prepare(batch, pool)
        for index in range(check_layer + 1, num_layers):
            residual = model.layer(index, residual, step, pool)
    return results


def _scattered(sequence: RecheckSequence, positions: list[int]) -> SequenceChunk:
    tokens = [sequence.token_ids[p] for p in positions]
    return SequenceChunk.scattered(tokens, positions, sequence.block_table)


def _newest_attention(
    model: LlamaForCausalLM,
    pool: KVPool,
    sequences: Sequence[RecheckSequence],
    check_layer: int,
) -> list[torch.Tensor]:  # float32 [len(token_ids)] each: mean over query heads
    """How much each sequence's newest token attends to each position at check_layer: the
    tokens run again up to that layer, together (their K/V rewritten with what they were),
    and their softmax read there."""
    newest = [len(s.token_ids) - 1 for s in sequences]
    chunks = [_scattered(s, [n]) for s, n in zip(sequences, newest, strict=True)]
    batch = ForwardBatch.build(chunks, model.config, pool)
    step = model.prepare(batch, pool)
    found: list[torch.Tensor] = []
    group = model.config.num_q_heads // model.config.num_kv_heads

    def softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                vc: torch.Tensor) -> None:  # fmt: skip
        for row, (sequence, last) in enumerate(zip(sequences, newest, strict=True)):
            table = torch.tensor(list(sequence.block_table), dtype=torch.int64, device=kc.device)
            keys = gather_context(kc, table, last).float()  # [S, Hkv, D]
            keys = keys.repeat_interleave(group, dim=1)  # [S, Hq, D]
            scores = torch.einsum("hd,shd->hs", q[row].float(), keys) * model.scale  # [Hq, S]
            weights = torch.softmax(scores, dim=-1).mean(0).cpu()
            found.append(torch.cat([weights, torch.zeros(1)]))  # the newest: not a candidate

    residual = model.embed(batch.input_ids)
    for index in range(check_layer + 1):
        probe = softmax if index == check_layer else None
        residual = model.layer(index, residual, step, pool, probe)
    return found


def _slots(
    positions: Sequence[int], block_table: Sequence[int], block_size: int, device: torch.device
) -> torch.Tensor:
    return torch.tensor(
        [block_table[p // block_size] * block_size + p % block_size for p in positions],
        dtype=torch.int64,
        device=device,
    )


def _check_spans(spans: Sequence[ReusedSpan], num_cached: int, length: int) -> None:
    end = num_cached
    for span in sorted(spans, key=lambda s: s.start):
        if not span.source_slots:
            raise ValueError("a reused span needs at least one token")
        if span.start < end:
            raise ValueError(
                f"span at {span.start} overlaps the shared prefix or another span (ends {end})"
            )
        if span.end > length:
            raise ValueError(f"span [{span.start}, {span.end}) runs past the {length}-token prompt")
        if span.source_start < 0:
            raise ValueError(f"span source_start {span.source_start} is negative")
        end = span.end
