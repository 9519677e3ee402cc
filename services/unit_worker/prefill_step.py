"""One prefill batch through the model: chunks in, first tokens out; or, in unified mode, one
forward pass that computes a prefill batch and steps the decoding requests together. Runs off
the event loop (on the worker's model thread; torch releases the GIL), so the worker keeps
answering health checks."""

from typing import NamedTuple

import torch

from duetserve.proto.tokens import TokenChunk
from duetserve.proto.workers import PrefillBatch, PrefillItem, PrefillResult
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.errors import RuntimeInputError
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
    if valid or residents:
        chunks = [_chunk(i) for i in valid] + decode_chunks(residents)
        forward = ForwardBatch.build(chunks, host.config, host.pool)
        logits = host.model.forward(forward, host.pool)  # [chunks, V]: each chunk's last token
        results, tokens = _prefill_outputs(host, valid, logits[: len(valid)])
        if residents:
            outcome = decode_outcome(host, residents, logits[len(valid) :])
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
    except (RuntimeInputError, ValueError) as err:
        return str(err)
    return None


def _prefill_outputs(
    host: ModelHost, items: list[PrefillItem], logits: torch.Tensor
) -> tuple[dict[str, PrefillResult], list[TokenChunk]]:
    """First tokens of the items whose last chunk this was, from their logits rows."""
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
        cached = sample.cached_tokens if index == 0 else None
        wants_logprobs = p.logprobs is not None
        tokens.append(token_chunk(request_id, index, token, wants_logprobs, finish, cached))
        results[request_id] = PrefillResult(
            request_id, wire_logprob(token), finished=finish is not None
        )
    return results, tokens
