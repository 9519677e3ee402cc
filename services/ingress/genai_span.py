"""The OpenTelemetry GenAI semantic conventions on ingress's server span (the one the tracing
middleware opens for each HTTP request), so that trace back ends that understand GenAI
(Jaeger, Tempo, Langfuse, Phoenix...) show a request's model, token usage and time to first
token without knowing Duet: `gen_ai.operation.name`, `gen_ai.request.*`, `gen_ai.response.*`,
`gen_ai.usage.input_tokens` / `output_tokens`, and `gen_ai.server.time_to_first_token` (the
convention's name for the figure, in seconds). Duet's own additions carry a `duet.` prefix.
A no-op while tracing is off (the span does not record)."""

from opentelemetry import trace

from duetserve.proto.scheduling import Sampling

CHAT = "chat"
TEXT_COMPLETION = "text_completion"


def annotate_request(operation: str, model: str, request_id: str, sampling: Sampling) -> None:
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": sampling.max_tokens,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
            "gen_ai.response.id": request_id,
            "gen_ai.response.model": model,
        }
    )
    if sampling.seed is not None:
        span.set_attribute("gen_ai.request.seed", sampling.seed)


def annotate_outcome(
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int,
    finish_reason: str | None,
    ttft_s: float | None,
    semantic_hit: bool = False,
) -> None:
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "gen_ai.usage.input_tokens": input_tokens,
            "gen_ai.usage.output_tokens": output_tokens,
            "duet.usage.cached_tokens": cached_tokens,
        }
    )
    if finish_reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
    if ttft_s is not None:
        span.set_attribute("gen_ai.server.time_to_first_token", ttft_s)
    if semantic_hit:
        span.set_attribute("duet.cache", "semantic")
