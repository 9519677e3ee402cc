"""cache_index settings (DUET_ prefix), parsed once at the entrypoint."""

from pathlib import Path
from typing import Literal

from pydantic import Field

from duetserve.common.settings import CommonSettings
from duetserve.services.cache_index.semantic_service import SemanticConfig


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
    # The semantic response cache (semantic_service.py): off unless DUET_SEMANTIC_CACHE=true
    # (ingress reads the same switch). Its answers live in DUET_SEMANTIC_STORE, an SQLite file
    # (unset: in memory, gone with the process); its categories in DUET_SEMANTIC_CATEGORIES
    # (unset: the shipped semantic_categories.json).
    semantic_cache: bool = False
    # sqlite (DUET_SEMANTIC_STORE) or jetstream: a bucket per category on the bus, shared by
    # every cache_index of a cluster (TTL: the category's longest).
    semantic_backend: Literal["sqlite", "jetstream"] = "sqlite"
    semantic_store: Path | None = None
    semantic_categories: Path | None = None
    semantic_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    semantic_threads: int = Field(1, ge=1)  # torch threads for embedding
    semantic_max_batch: int = Field(32, ge=1)
    semantic_sweep_interval_s: float = Field(60.0, gt=0)

    def semantic_config(self) -> SemanticConfig:
        return SemanticConfig(
            backend=self.semantic_backend,
            store=self.semantic_store,
            categories=self.semantic_categories,
            dtype=self.semantic_dtype,
            threads=self.semantic_threads,
            max_batch=self.semantic_max_batch,
            sweep_interval_s=self.semantic_sweep_interval_s,
        )
