"""One prefill batch through the model: chunks in, first tokens out. Runs off the event loop
(in a thread; torch releases the GIL), so the worker keeps answering health checks."""

from typing import NamedTuple

from duetserve.proto.tokens import TokenChunk
from duetserve.proto.workers import PrefillBatch, PrefillItem, PrefillResult
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.errors import RuntimeInputError
from duetserve.services.unit_worker.model_host import ModelHost
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


def run_prefill(host: ModelHost, batch: PrefillBatch) -> PrefillOutput:
    """Validate every item on its own (a bad one fails alone), run the rest as one batch."""
    errors: dict[str, str] = {}
    valid: list[PrefillItem] = []
    for item in batch.items:
        problem = _check(host, item)
        if problem is None:
            valid.append(item)
        else:
            errors[item.request_id] = problem
    results, tokens = _forward(host, valid) if valid else ({}, [])
    results.update({rid: PrefillResult(rid, error=why) for rid, why in errors.items()})
    return PrefillOutput(tuple(results[i.request_id] for i in batch.items), tuple(tokens))


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


def _forward(
    host: ModelHost, items: list[PrefillItem]
) -> tuple[dict[str, PrefillResult], list[TokenChunk]]:
    batch = ForwardBatch.build([_chunk(i) for i in items], host.config, host.pool)
    logits = host.model.forward(batch, host.pool)  # [len(items), V]: each chunk's last token
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
