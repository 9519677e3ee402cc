"""Catching stale writers: freed blocks are filled with a pattern, checked when handed out.

With DUET_KV_POISON=1 kv_manager fills every free block of the pool with the byte 0xA5 (a
pattern no forward pass writes whole) and, when it allocates blocks again, checks that each
still holds it. A block that does not was written while nobody held it: a stale owner (a worker
that lost its lease, a batch that outlived its request) wrote into memory that was free. Each
such block is counted (KvStats.stale_writes) and logged with the owners it last had. The
fault suite runs with it on; it costs a fill and a compare per block, so it is off by default.
"""

import logging
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)
PATTERN = 0xA5


class PoisonCheck:
    def __init__(self, pool: torch.Tensor) -> None:
        """`pool`: the KV pool, [layers, 2, blocks, block_size, kv_heads, head_dim]."""
        self.pool = pool
        self.stale_writes = 0
        self.last_owners: dict[int, list[str]] = {}

    def _bytes(self, block: int) -> torch.Tensor:
        return self.pool[:, :, block].view(torch.uint8)

    def poison(self, blocks: Iterable[int], owners: list[str] | None = None) -> None:
        """Fill freed blocks with the pattern (and remember who had them)."""
        for block in blocks:
            self._bytes(block).fill_(PATTERN)
            if owners is not None:
                self.last_owners[block] = owners

    def check(self, blocks: Iterable[int]) -> list[int]:
        """The blocks, about to be handed out, that were written while free."""
        written = [b for b in blocks if not bool((self._bytes(b) == PATTERN).all())]
        for block in written:
            self.stale_writes += 1
            logger.error(
                "block %d was written while free (a stale writer); it last belonged to %s",
                block,
                ", ".join(self.last_owners.get(block, [])) or "nobody recorded",
            )
        return written
