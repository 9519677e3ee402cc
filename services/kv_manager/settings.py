"""kv_manager settings (DUET_ prefix), parsed once at the entrypoint.

    DUET_MODEL=/models/tiny DUET_DTYPE=bfloat16 DUET_KV_CACHE_MB=512 \
        python -m duetserve.services.kv_manager

The pool holds `num_blocks` blocks when that is set, else as many as fit in `kv_cache_mb`. In
disagg mode that budget is the unit's, split between two pools, each with its own weight copy:
the unit pool (the prefill worker's, where the prefix cache lives) and the decode worker's pool,
which gets `decode_pool_share` of the blocks.
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from duetserve.common.settings import ServingSettings


class KVManagerSettings(ServingSettings):
    unit: str = "unit0"
    model: Path  # DUET_MODEL: the checkpoint directory (config.json, safetensors)
    block_size: int = Field(16, gt=0)  # tokens per KV block
    kv_cache_mb: float = Field(256.0, gt=0)  # the KV pool's size budget, in MiB
    num_blocks: int | None = Field(None, gt=0)  # overrides kv_cache_mb
    lease_s: float = Field(5.0, gt=0)  # a holder that has not heart-beaten for this long loses
    storage: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA IPC if usable, else /dev/shm
    cuda_device: int = Field(0, ge=0)
    region: str | None = None  # the /dev/shm name on the CPU; see region_name
    decode_pool_share: float = Field(0.5, gt=0, lt=1)  # disagg: the decode pool's blocks
    # On the CPU: keep the linear weights in oneDNN's packed layout (runtime/layers/prepack.py),
    # 1.2-3x faster matmuls; false keeps the plain layout (for comparisons).
    prepack_weights: bool = True
    kv_poison: bool = False  # DUET_KV_POISON: catch stale writers (poison.py); costs time
    # Where replacement workers it starts log (<var_dir>/logs, as the launcher's services do);
    # unset: to kv_manager's own output.
    var_dir: Path | None = None

    def region_name(self) -> str:
        """The configured /dev/shm name, or `duet-<unit>-<pid>` (unique on this machine)."""
        return self.region or f"duet-{self.unit}-{os.getpid()}"

    def pool_blocks(self, bytes_per_block: int) -> int:
        """How many KV blocks the pool holds: `num_blocks`, or what fits in `kv_cache_mb`."""
        if self.num_blocks is not None:
            return self.num_blocks
        blocks = int(self.kv_cache_mb * 2**20) // bytes_per_block
        if blocks < 1:
            raise ValueError(
                f"kv_cache_mb={self.kv_cache_mb:g} holds no block of {bytes_per_block} bytes"
            )
        return blocks

    def host_blocks(self, bytes_per_block: int) -> int:
        """How many KV blocks the host tier holds (0: no host tier)."""
        return int(self.host_kv_mb * 2**20) // bytes_per_block

    def split_blocks(self, total: int) -> tuple[int, int]:
        """disagg: (unit pool, decode pool) blocks out of the unit's `total`, each >= 1."""
        if total < 2:
            raise ValueError(f"disagg mode needs two KV pools; {total} block(s) make one")
        decode = min(max(round(total * self.decode_pool_share), 1), total - 1)
        return total - decode, decode
