"""cache_index settings (DUET_ prefix), parsed once at the entrypoint."""

from pydantic import Field

from duetserve.common.settings import CommonSettings


class CacheIndexSettings(CommonSettings):
    unit: str = "unit0"  # whose kv_manager holds the blocks the index names
    # The kv_manager owner (and holder) of every reference the index holds; no '/'. Unset: the
    # instance name, so that a restarted index never shares a name with its predecessor.
    holder: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    heartbeat_interval_s: float = Field(1.0, gt=0)  # well under kv_manager's lease_s
    # DUET_HOST_KV_MB, as kv_manager reads it: > 0, the unit has a host tier, and the index
    # keeps the host blocks requests leave there too (their earlier turns).
    host_kv_mb: float = Field(0.0, ge=0)
    # DUET_HOST_CACHE_SHARE: the share of the host tier's blocks the index may keep (the rest
    # stays for swaps, which never wait for an eviction); 0: it keeps none.
    host_cache_share: float = Field(0.5, ge=0, le=1)
