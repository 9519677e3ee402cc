"""Process-wide logging: one line per record on stderr, as JSON or as plain text.

JSON lines carry `ts`, `level`, `service`, `logger`, `msg`, every field passed through
`extra=`, `trace_id`/`span_id` when a span is current, and `exc` with the traceback when
there is one. `setup_logging` may be called again (tests, reconfiguration): it replaces the
handler it installed before instead of adding a second one.
"""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from opentelemetry import trace

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)
# Marks the handler setup_logging installed, so a second call replaces it.
_HANDLER_FLAG = "_duet_handler"


def setup_logging(
    service: str,
    level: str = "INFO",
    fmt: Literal["json", "text"] | str = "json",
    stream: TextIO | None = None,
) -> None:
    """Send every logger's records to `stream` (stderr by default) in `fmt`, at `level`."""
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(service)
    elif fmt == "text":
        formatter = TextFormatter(service)
    else:
        raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_FLAG, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller attached to `record` with `extra=`."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


def _trace_ids() -> dict[str, str]:
    """Ids of the current span, if one is recording or came from a caller."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(span_context.trace_id),
        "span_id": trace.format_span_id(span_context.span_id),
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values JSON cannot encode are written with str()."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_trace_ids())
        line.update(extra_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level service logger: message key=value ...` for a human at a terminal."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = extra_fields(record)
        if not extras:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback below the fields
        fields = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{head} {fields}{sep}{tail}"
