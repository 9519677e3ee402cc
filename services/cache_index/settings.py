"""cache_index settings (DUET_ prefix), parsed once at the entrypoint."""

from pydantic import Field

from duetserve.common.settings import CommonSettings


class CacheIndexSettings(CommonSettings):
    unit: str = "unit0"  # whose kv_manager holds the blocks the index names
    # The kv_manager owner (and holder) of every reference the index holds; no '/'. Unset: the
    # instance name, so that a restarted index never shares a name with its predecessor.
    holder: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    heartbeat_interval_s: float = Field(1.0, gt=0)  # well under kv_manager's lease_s
