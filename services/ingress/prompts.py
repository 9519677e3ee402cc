"""From a validated request to what the scheduler is sent: prompt token ids, the output budget,
sampling, the SLO and the cache hint. Pure (no I/O); every refusal is a 400 ApiError.

Completions take text (encoded with the model's special tokens, BOS say) or token ids (which
must lie in the vocabulary); chats are rendered with the model's chat template. The prompt and
its output budget must fit the context window, worded as vLLM words it.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from duetserve.common.lengths import LengthPredictor
from duetserve.proto.scheduling import Sampling, Slo, SloKind
from duetserve.runtime.errors import UnsupportedModelError
from duetserve.runtime.tokenizer import ChatTemplateError, Tokenizer
from duetserve.services.ingress.api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DuetExtension,
)
from duetserve.services.ingress.errors import ApiError


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What a request is checked against: the context window and the usable token ids."""

    context_len: int
    vocab_size: int  # ids below this are known to the model and the tokenizer alike
    default_slo: Slo


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    slo: Slo
    public_prefix_tokens: int
    stops: tuple[str, ...]
    output_bound: int | None = None  # its output's predicted upper bound (output_bound below)
    public_spans: bool = False  # duet.cache.public_spans


def prepare_completion(
    req: CompletionRequest,
    tokenizer: Tokenizer,
    limits: ModelLimits,
    lengths: LengthPredictor | None = None,
) -> PreparedPrompt:
    prompt = req.prompt_text_or_ids
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        check_token_ids(prompt, limits.vocab_size, "prompt")
        ids = list(prompt)
    # An omitted max_tokens (16) shrinks to fit; one the client asked for is checked as given.
    fit = "max_tokens" not in req.model_fields_set
    max_tokens = output_budget(len(ids), req.max_tokens, limits.context_len, "prompt", fit)
    prepared = _prepared(req, ids, req.sampling(max_tokens, req.logprobs), limits)
    if lengths is None and stated_length(req.duet) is None:
        return prepared
    text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
    bound = output_bound(lengths, text, prepared.sampling, stated_length(req.duet))
    return replace(prepared, output_bound=bound)


def prepare_chat(
    req: ChatCompletionRequest,
    tokenizer: Tokenizer,
    limits: ModelLimits,
    lengths: LengthPredictor | None = None,
) -> PreparedPrompt:
    try:
        ids = tokenizer.encode_chat(
            req.template_messages(), add_generation_prompt=req.add_generation_prompt
        )
    except ChatTemplateError as err:  # said without the server's model path
        reason = err.__cause__ or err
        raise ApiError.bad_request(
            f"messages: the chat template failed: {reason}", "messages"
        ) from None
    except UnsupportedModelError:
        raise ApiError.bad_request("This model has no chat template.", "messages") from None
    requested = req.requested_max_tokens
    max_tokens = output_budget(
        len(ids), requested, limits.context_len, "messages", fit=requested is None
    )
    prepared = _prepared(req, ids, req.sampling(max_tokens, req.logprobs_count), limits)
    if lengths is None and stated_length(req.duet) is None:
        return prepared
    text = question_text(req.template_messages())
    bound = output_bound(lengths, text, prepared.sampling, stated_length(req.duet))
    return replace(prepared, output_bound=bound)


def question_text(messages: Sequence[Mapping[str, str]]) -> str:
    """What a chat's answer answers: its last user message (the predictor was trained on
    single questions), else everything said."""
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return "\n".join(message["content"] for message in messages)


def stated_length(duet: DuetExtension | None) -> int | None:
    return None if duet is None else duet.expected_output_tokens


def output_bound(
    lengths: LengthPredictor | None, text: str, sampling: Sampling, stated: int | None = None
) -> int | None:
    """A conservative upper bound of the answer's tokens: exactly max_tokens when EOS is
    ignored, else what the client stated, else the predictor's (None without one); within
    [min_tokens, max_tokens]."""
    if sampling.ignore_eos:
        return sampling.max_tokens
    if stated is not None:
        return max(1, sampling.min_tokens, min(stated, sampling.max_tokens))
    if lengths is None:
        return None
    return lengths.bound(text, sampling.max_tokens, sampling.min_tokens)


def _prepared(
    req: CompletionRequest | ChatCompletionRequest,
    ids: list[int],
    sampling: Sampling,
    limits: ModelLimits,
) -> PreparedPrompt:
    if not ids:
        raise ApiError.bad_request("The prompt is empty after tokenization.", param="prompt")
    check_token_ids(sampling.stop_token_ids, limits.vocab_size, "stop_token_ids")
    if sampling.min_tokens > sampling.max_tokens:
        raise ApiError.bad_request(
            f"min_tokens ({sampling.min_tokens}) must be at most max_tokens "
            f"({sampling.max_tokens}, for this prompt).",
            param="min_tokens",
        )
    return PreparedPrompt(
        prompt_ids=tuple(ids),
        sampling=sampling,
        slo=request_slo(req.duet, limits.default_slo),
        public_prefix_tokens=public_prefix(req.duet, len(ids)),
        stops=req.stop_strings,
        public_spans=bool(req.duet and req.duet.cache and req.duet.cache.public_spans),
    )


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    for token_id in ids:
        if not 0 <= token_id < vocab_size:
            raise ApiError.bad_request(
                f"{param}: token id {token_id} is out of vocabulary (vocabulary size "
                f"{vocab_size}).",
                param=param,
            )


def output_budget(
    prompt_len: int, requested: int | None, context_len: int, prompt_param: str, fit: bool
) -> int:
    """max_tokens for this prompt: `requested`, or, when `fit`, at most what the context
    leaves. A 400 in vLLM's words when the prompt, or prompt plus requested, does not fit."""
    room = context_len - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"This model's maximum context length is {context_len} tokens. However, your "
            f"{prompt_param} is {prompt_len} tokens long, which leaves no room for a completion. "
            f"Please reduce the length of the {prompt_param}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None or (fit and requested > room):
        return room
    if prompt_len + requested > context_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {context_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, "
            f"{requested} in the completion). Please reduce the length of the {prompt_param} "
            "or completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def request_slo(duet: DuetExtension | None, default: Slo) -> Slo:
    if duet is None or duet.slo is None:
        return default
    try:
        return duet.slo.to_proto()
    except ValueError as err:
        raise ApiError.bad_request(str(err), param="duet.slo") from None


def public_prefix(duet: DuetExtension | None, prompt_len: int) -> int:
    """The cache hint's shareable prefix, at most the whole prompt."""
    if duet is None or duet.cache is None:
        return 0
    return min(duet.cache.public_prefix_tokens, prompt_len)


def default_slo(ttft_ms: float, tpot_ms: float) -> Slo:
    return Slo(SloKind.LATENCY, ttft_ms=ttft_ms, tpot_ms=tpot_ms, from_request=False)
