"""Tracing is off unless an exporter is configured; trace context in headers either way."""

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from duetserve.common.settings import CommonSettings
from duetserve.common.tracing import (
    active_tracer,
    extract_context,
    inject_headers,
    otlp_traces_url,
    setup_tracing,
    shutdown_tracing,
)


@pytest.fixture(autouse=True)
def tracing_off_after() -> Iterator[None]:
    yield
    shutdown_tracing()


def test_off_by_default_with_a_no_op_tracer() -> None:
    tracer = setup_tracing("scheduler", CommonSettings(otel_endpoint=None, trace_console=False))
    assert active_tracer() is None
    with tracer.start_as_current_span("nothing") as span:
        assert not span.is_recording()
        assert inject_headers() == {}


def test_span_processor_turns_tracing_on() -> None:
    exporter = InMemorySpanExporter()
    settings = CommonSettings(otel_endpoint=None, instance="sched-0")
    tracer = setup_tracing("scheduler", settings, span_processor=SimpleSpanProcessor(exporter))
    assert active_tracer() is tracer
    with tracer.start_as_current_span("plan"):
        pass
    [span] = exporter.get_finished_spans()
    assert span.name == "plan"
    assert span.resource.attributes["service.name"] == "scheduler"
    assert span.resource.attributes["service.instance.id"] == "sched-0"
    shutdown_tracing()
    assert active_tracer() is None


def test_headers_round_trip_the_current_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        headers = inject_headers({"x-other": "kept"})
    assert headers["x-other"] == "kept"
    assert headers["traceparent"].startswith("00-")
    remote = trace.get_current_span(extract_context(headers)).get_span_context()
    assert remote.trace_id == caller.get_span_context().trace_id
    assert remote.span_id == caller.get_span_context().span_id
    assert remote.is_remote


def test_missing_or_bad_headers_give_an_empty_context() -> None:
    for headers in (None, {}, {"traceparent": "garbage"}):
        span = trace.get_current_span(extract_context(headers))
        assert not span.get_span_context().is_valid


def test_otlp_traces_url_appends_the_signal_path_once() -> None:
    assert otlp_traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert otlp_traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert otlp_traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
