"""setup_logging: JSON lines that parse and carry their fields; text lines; idempotence."""

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from duetserve.common.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_standard_and_extra_fields() -> None:
    stream = io.StringIO()
    setup_logging("scheduler", "INFO", "json", stream=stream)
    log = logging.getLogger("duetserve.test")
    log.info("admitted %s", "req-1", extra={"request_id": "req-1", "blocks": 4})
    log.debug("hidden below INFO")
    [line] = json_lines(stream)
    assert line["level"] == "INFO" and line["service"] == "scheduler"
    assert line["logger"] == "duetserve.test" and line["msg"] == "admitted req-1"
    assert line["request_id"] == "req-1" and line["blocks"] == 4
    assert isinstance(line["ts"], str) and line["ts"].endswith("+00:00")


def test_json_lines_carry_exceptions_and_odd_values() -> None:
    stream = io.StringIO()
    setup_logging("ingress", "debug", "json", stream=stream)
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("x").exception("lookup failed", extra={"where": object()})
    [line] = json_lines(stream)
    assert line["level"] == "ERROR"
    assert "KeyError: 'missing'" in str(line["exc"])
    assert str(line["where"]).startswith("<object object")


def test_json_lines_carry_current_trace_ids() -> None:
    stream = io.StringIO()
    setup_logging("worker", "INFO", "json", stream=stream)
    with TracerProvider().get_tracer("test").start_as_current_span("step") as span:
        logging.getLogger("x").info("inside a span")
    logging.getLogger("x").info("outside")
    inside, outside = json_lines(stream)
    assert inside["trace_id"] == trace.format_trace_id(span.get_span_context().trace_id)
    assert "trace_id" not in outside


def test_text_format_and_setup_is_idempotent() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("kv_manager", "INFO", "text", stream=first)
    setup_logging("kv_manager", "INFO", "text", stream=second)
    logging.getLogger("duetserve.test").warning("pool low", extra={"free_blocks": 3})
    assert first.getvalue() == ""
    [line] = second.getvalue().splitlines()
    assert "WARNING kv_manager duetserve.test: pool low free_blocks=3" in line


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging("x", "INFO", "xml")
