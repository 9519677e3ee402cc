"""Tracing: off unless configured, W3C trace context in NATS headers either way.

`setup_tracing` turns tracing on only when an exporter is configured (an OTLP/HTTP endpoint,
the console, or a span processor handed in by a test). Off, it returns a no-op tracer and
installs nothing, so a benchmark pays nothing and prints nothing.

Context propagation works whether or not this process records spans: `inject_headers` writes
the current span's `traceparent` (and `tracestate`) if there is a valid one, and
`extract_context` reads them back, so a service that does not trace still passes its caller's
trace on to the services it calls.
"""

import contextlib
import logging
from collections.abc import Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from duetserve.common.settings import CommonSettings

logger = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_OTLP_TRACES_PATH = "/v1/traces"


class _TracingState:
    """The provider setup_tracing built, if any, and the tracer it handed out."""

    provider: TracerProvider | None = None
    tracer: Tracer | None = None


def setup_tracing(
    service: str,
    settings: CommonSettings,
    *,
    span_processor: SpanProcessor | None = None,
) -> Tracer:
    """A tracer for `service`: recording if an exporter is configured, a no-op one otherwise.

    The first provider built in a process also becomes OpenTelemetry's global provider (the
    global can be set only once); later calls replace the tracer this module hands out.
    """
    processors = _span_processors(settings, span_processor)
    if not processors:
        return trace.NoOpTracer()
    shutdown_tracing()
    resource = Resource.create(
        {"service.name": service, "service.instance.id": settings.instance_name(service)}
    )
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    _TracingState.provider = provider
    _TracingState.tracer = provider.get_tracer("duetserve")
    logger.info("tracing on", extra={"exporters": [type(p).__name__ for p in processors]})
    return _TracingState.tracer


def _span_processors(settings: CommonSettings, extra: SpanProcessor | None) -> list[SpanProcessor]:
    """The processors the settings ask for, plus `extra`."""
    processors: list[SpanProcessor] = []
    if settings.otel_endpoint:
        # Imported here: the exporter pulls in requests and protobuf, which an untraced
        # process never needs.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_traces_url(settings.otel_endpoint)
        processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if settings.trace_console:
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    if extra is not None:
        processors.append(extra)
    return processors


def otlp_traces_url(endpoint: str) -> str:
    """The traces URL for a base OTLP/HTTP endpoint, as the SDK derives it from the env var.

    An endpoint passed to the exporter explicitly is used verbatim, so the `/v1/traces` path
    the SDK appends to `OTEL_EXPORTER_OTLP_ENDPOINT` must be appended here.
    """
    base = endpoint.rstrip("/")
    return base if base.endswith(_OTLP_TRACES_PATH) else base + _OTLP_TRACES_PATH


def active_tracer() -> Tracer | None:
    """The tracer setup_tracing turned on, or None while tracing is off."""
    return _TracingState.tracer


def shutdown_tracing() -> None:
    """Flush and close the exporters, then turn tracing off; safe to call when it is off."""
    provider = _TracingState.provider
    _TracingState.provider = None
    _TracingState.tracer = None
    if provider is not None:
        provider.shutdown()


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """`headers` (a new dict if None) plus the current trace context, if there is one."""
    carrier = {} if headers is None else headers
    _PROPAGATOR.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The trace context carried by `headers`; an empty context if they carry none."""
    if not headers:
        return Context()
    return _PROPAGATOR.extract(headers)


def current_traceparent() -> str:
    """The current context as a W3C traceparent string ("" when there is none): for work on
    one request that travels inside a batch message rather than in a message's headers."""
    return inject_headers().get("traceparent", "")


@contextlib.contextmanager
def traced_as(traceparent: str, span: str | None = None) -> Iterator[None]:
    """Run the block in the trace a `current_traceparent()` string names, inside a span of its
    own when `span` is given and tracing is on (a no-op for "")."""
    if not traceparent:
        yield
        return
    token = otel_context.attach(extract_context({"traceparent": traceparent}))
    try:
        tracer = active_tracer()
        if span is None or tracer is None:
            yield
        else:
            with tracer.start_as_current_span(span):
                yield
    finally:
        otel_context.detach(token)
