"""Messages every service speaks: health and error replies."""

from dataclasses import dataclass
from enum import StrEnum

from duetserve.proto.codec import message


class HealthStatus(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@message("health.query")
@dataclass(frozen=True, slots=True)
class HealthQuery:
    pass


@message("health.reply")
@dataclass(frozen=True, slots=True)
class HealthReply:
    service: str
    instance: str
    status: HealthStatus
    detail: str = ""


@message("error")
@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The answer to a request that could not be served. `code` is machine-readable
    (e.g. invalid_message, unknown_message, version_mismatch, out_of_blocks)."""

    code: str
    message: str
    retry_after_s: float | None = None  # when it is worth asking again (overloaded, busy)
