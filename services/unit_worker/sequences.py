"""Wire sampling state to the runtime's, and sampled tokens back to the wire."""

from duetserve.proto.scheduling import Sampling
from duetserve.proto.tokens import FinishReason, TokenChunk, TokenLogprob, TopLogprob
from duetserve.proto.workers import SamplingState
from duetserve.runtime.sampling import FinishReason as RuntimeFinish
from duetserve.runtime.sampling import (
    SampledToken,
    SamplingParams,
    SequenceSamplingState,
    finish_reason,
)


def sampling_params(sampling: Sampling, vocab_size: int) -> SamplingParams:
    """The runtime's parameters; raises SamplingParamsError (a RuntimeInputError) if invalid."""
    params = SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        repetition_penalty=sampling.repetition_penalty,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        min_tokens=sampling.min_tokens,
        ignore_eos=sampling.ignore_eos,
        stop_token_ids=sampling.stop_token_ids,
        logprobs=sampling.logprobs,
        seed=sampling.seed,
    )
    params.validate(vocab_size)
    return params


def runtime_state(state: SamplingState, params: SamplingParams) -> SequenceSamplingState:
    return SequenceSamplingState(params, state.prompt_token_ids, list(state.output_token_ids))


def wire_logprob(sampled: SampledToken) -> TokenLogprob:
    """The sampled token with its logprob (0.0 when none was asked for) and alternatives."""
    chosen = sampled.logprob
    top = tuple(TopLogprob(t.token_id, t.logprob) for t in sampled.top_logprobs)
    return TokenLogprob(sampled.token_id, chosen.logprob if chosen is not None else 0.0, top)


def finish_of(
    params: SamplingParams, eos_token_ids: frozenset[int], output_token_ids: list[int]
) -> FinishReason | None:
    """Whether the newest output token ends the request, in the wire's terms."""
    reason = finish_reason(params, eos_token_ids, output_token_ids)
    if reason is None:
        return None
    return FinishReason.STOP if reason == RuntimeFinish.STOP else FinishReason.LENGTH


def token_chunk(
    request_id: str,
    index: int,
    sampled: SampledToken,
    wants_logprobs: bool,
    finish: FinishReason | None,
    cached_tokens: int | None = None,
) -> TokenChunk:
    logprobs = (wire_logprob(sampled),) if wants_logprobs else ()
    return TokenChunk(
        request_id,
        index,
        (sampled.token_id,),
        logprobs=logprobs,
        finish_reason=finish,
        cached_tokens=cached_tokens,
    )
