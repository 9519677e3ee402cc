"""The roles of a unit that only one process may hold at a time (its kv_manager, its
scheduler), as a JetStream key-value bucket stores them: key `<unit>.<role>` in UNITS_BUCKET,
its value the RoleHolder, kept alive by renewal (the bucket's entries expire)."""

from dataclasses import dataclass

from duetserve.proto.codec import message
from duetserve.proto.subjects import check_token

UNITS_BUCKET = "duet_units"


def role_key(unit: str, role: str) -> str:
    return f"{check_token(unit, 'unit')}.{check_token(role, 'role')}"


@message("units.role_holder")
@dataclass(frozen=True, slots=True)
class RoleHolder:
    instance: str
    pid: int
    host: str
    started: int = 0  # the process's start time (clock ticks after boot): tells pid reuse
