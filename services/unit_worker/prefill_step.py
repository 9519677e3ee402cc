"""One prefill batch through the model: chunks in, first tokens out; or, in unified mode, one
forward pass that computes a prefill batch and steps the decoding requests together. Runs off
the event loop (on the worker's model thread; torch releases the GIL), so the worker keeps
answering health checks.

An item that reuses cached spans (KVShare: `PrefillItem.reuse`) runs on its own after that
pass, through runtime/kv_reuse.py: its spans' K/V placed, only the selected rows computed in the
later layers. Its first token's `cached_tokens` counts the placed tokens that stood besides the
prefix cache's."""

from typing import NamedTuple

import torch

from duetserve.proto.tokens import TokenChunk
from duetserve.proto.workers import PrefillBatch, PrefillItem, PrefillResult
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.errors import RuntimeInputError
from duetserve.runtime.kv_reuse import ReusedSpan, ReusePrefill, prefill_with_reuse
from duetserve.services.unit_worker.model_host import ModelHost
from duetserve.services.unit_worker.residents import (
    Resident,
    StepOutcome,
    decode_chunks,
    decode_outcome,
)
from duetserve.services.unit_worker.sequences import (
    finish_of,
    runtime_state,
    sampling_params,
    token_chunk,
    wire_logprob,
)


class PrefillOutput(NamedTuple):
    results: tuple[PrefillResult, ...]
    tokens: tuple[TokenChunk, ...]  # first tokens, to publish on each request's stream


def streams_of(batch: PrefillBatch) -> dict[str, str]:
    """The stream of each request whose first token the batch samples."""
    return {i.request_id: i.sample.stream for i in batch.items if i.sample is not None}


def run_prefill(host: ModelHost, batch: PrefillBatch) -> PrefillOutput:
    """Validate every item on its own (a bad one fails alone), run the rest as one batch."""
    output, _ = mixed_step(host, batch, [])
    return output


def mixed_step(
    host: ModelHost, batch: PrefillBatch, residents: list[Resident]
) -> tuple[PrefillOutput, StepOutcome]:
    """One forward pass over the batch's valid prompt chunks and the residents' newest tokens
    (chunked prefill beside decode, as a unified worker runs them); a bad item fails alone."""
    errors: dict[str, str] = {}
    valid: list[PrefillItem] = []
    for item in batch.items:
        problem = _check(host, item)
        if problem is None:
            valid.append(item)
        else:
            errors[item.request_id] = problem
    results: dict[str, PrefillResult] = {}
    tokens: list[TokenChunk] = []
    outcome = StepOutcome((), ())
    plain = [i for i in valid if not i.reuse]
    if plain or residents:
        chunks = [_chunk(i) for i in plain] + decode_chunks(residents)
        forward = ForwardBatch.build(chunks, host.config, host.pool)
        logits = host.model.forward(forward, host.pool)  # [chunks, V]: each chunk's last token
        results, tokens = _prefill_outputs(host, plain, logits[: len(plain)])
        if residents:
            outcome = decode_outcome(host, residents, logits[len(plain) :])
    for item in valid:
        if item.reuse:
            done = _prefill_reusing(host, item)
            placed = len(done.kept)
            result, token = _prefill_outputs(host, [item], done.logits[None], placed)
            results[item.request_id] = _with_report(result[item.request_id], done)
            tokens.extend(token)
    results.update({rid: PrefillResult(rid, error=why) for rid, why in errors.items()})
    output = PrefillOutput(tuple(results[i.request_id] for i in batch.items), tuple(tokens))
    return output, outcome


def _chunk(item: PrefillItem) -> SequenceChunk:
    return SequenceChunk(item.token_ids, item.num_cached_tokens, item.block_table)


def _check(host: ModelHost, item: PrefillItem) -> str | None:
    try:
        ForwardBatch.build([_chunk(item)], host.config, host.pool)
        if item.sample is not None:
            sampling_params(item.sample.sampling, host.config.vocab_size)
        if item.reuse:
            _check_reuse(host, item)
    except (RuntimeInputError, ValueError) as err:
        return str(err)
    return None


def _check_reuse(host: ModelHost, item: PrefillItem) -> None:
    """What prefill_with_reuse would refuse only after writing: checked before anything is."""
    if item.sample is None:
        raise ValueError("a prefill reusing spans must complete the prompt")
    if not 0.0 <= item.recompute <= 1.0:
        raise ValueError(f"recompute {item.recompute} outside [0, 1]")
    if not 0 <= item.check_layer < host.config.num_layers:
        raise ValueError(f"check_layer {item.check_layer} outside the model's layers")
    end = item.num_cached_tokens
    num_blocks = host.pool.num_blocks
    for span in sorted(item.reuse, key=lambda s: s.start):
        needed = (span.source_start + span.length - 1) // host.pool.block_size
        needed -= span.source_start // host.pool.block_size
        if span.length < 1 or span.start < end or span.source_start < 0:
            raise ValueError(f"span at {span.start}: empty, negative or overlapping")
        if len(span.source_block_ids) != needed + 1:
            raise ValueError(f"span at {span.start}: {len(span.source_block_ids)} source blocks")
        if not all(0 <= b < num_blocks for b in span.source_block_ids):
            raise ValueError(f"span at {span.start}: a source block outside the pool")
        end = span.start + span.length
    if end > item.num_cached_tokens + len(item.token_ids):
        raise ValueError("a span runs past the prompt")


def _prefill_reusing(host: ModelHost, item: PrefillItem) -> ReusePrefill:
    bs = host.pool.block_size
    spans = []
    for span in item.reuse:
        first = span.source_start // bs
        slots = [
            span.source_block_ids[p // bs - first] * bs + p % bs
            for p in range(span.source_start, span.source_start + span.length)
        ]
        spans.append(ReusedSpan(span.start, slots, span.source_start))
    return prefill_with_reuse(
        host.model,
        host.pool,
        item.token_ids,
        item.block_table,
        item.num_cached_tokens,
        spans,
        item.recompute,
        item.check_layer,
    )


def _with_report(result: PrefillResult, done: ReusePrefill) -> PrefillResult:
    kept = done.kept
    return PrefillResult(
        result.request_id,
        result.token,
        result.finished,
        result.error,
        reused=len(done.reused),
        recomputed=len(done.recomputed),
        first_kept=kept[0] if kept else -1,
        deviation=float(done.deviation.mean()) if len(done.reused) else 0.0,
    )


def _prefill_outputs(
    host: ModelHost, items: list[PrefillItem], logits: torch.Tensor, placed: int = 0
) -> tuple[dict[str, PrefillResult], list[TokenChunk]]:
    """First tokens of the items whose last chunk this was, from their logits rows; `placed`:
    tokens reused from spans (one item), counted as cached."""
    results = {i.request_id: PrefillResult(i.request_id) for i in items}
    to_sample = [(row, i.request_id, i.sample) for row, i in enumerate(items) if i.sample]
    if not to_sample:
        return results, []
    params = [sampling_params(s.sampling, host.config.vocab_size) for _, _, s in to_sample]
    states = [runtime_state(s, p) for (_, _, s), p in zip(to_sample, params, strict=True)]
    sampled = host.sampler.sample(logits[[row for row, _, _ in to_sample]], states)
    tokens = []
    for (_, request_id, sample), p, token in zip(to_sample, params, sampled, strict=True):
        index = len(sample.output_token_ids)
        finish = finish_of(p, host.eos_token_ids, [*sample.output_token_ids, token.token_id])
        cached = sample.cached_tokens + placed if index == 0 else None
        wants_logprobs = p.logprobs is not None
        tokens.append(token_chunk(request_id, index, token, wants_logprobs, finish, cached))
        results[request_id] = PrefillResult(
            request_id, wire_logprob(token), finished=finish is not None
        )
    return results, tokens
