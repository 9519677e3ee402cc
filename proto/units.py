"""A unit's entries in a JetStream key-value bucket (UNITS_BUCKET), each kept alive by renewal
(the bucket's entries expire):
- the roles only one process may hold at a time (its kv_manager, its scheduler): key
  `<unit>.<role>`, its value the RoleHolder;
- its card (`<unit>.card`): the registry of live units and their load, which ingress routes
  requests by."""

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


def card_key(unit: str) -> str:
    """Where a unit's card lives in UNITS_BUCKET (beside its role leases)."""
    return f"{check_token(unit, 'unit')}.card"


CARD_KEYS = "*.card"  # every unit's card, for a watch


@message("units.card")
@dataclass(frozen=True, slots=True)
class UnitCard:
    """A unit's entry in the registry, rewritten by its scheduler every few seconds and gone
    from the bucket a TTL after the last (the unit died): what ingress routes by."""

    unit: str
    scheduler: str  # the instance that wrote it
    waiting: int
    running: int  # prefilling or decoding
    running_limit: int  # how many it lets run at once now
    free_blocks: int
    total_blocks: int
    written_at: float = 0.0  # wall clock (an old card read later is not taken for fresh)
    # Where its prefix cache is likely warm: the first PREFIX_KEY_BYTES of the block keys
    # (common/block_hash.py) of recent prompts at depths 1, 2, 4, 8... blocks of block_size.
    block_size: int = 0
    prefixes: tuple[bytes, ...] = ()


PREFIX_KEY_BYTES = 8


def summarised(depth: int) -> bool:
    """Whether a card lists the key of a prefix `depth` blocks deep: 1, 2, 4, 8..."""
    return depth > 0 and depth & (depth - 1) == 0
