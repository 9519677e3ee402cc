"""disagg mode: a request's KV copied from the unit pool (where the prefill worker wrote it) into
the decode worker's own pool, block by block, when decode admits the request.

Both pools live in memory kv_manager shares (/dev/shm on the CPU, CUDA IPC allocations on one
device), so the copy is a plain tensor copy between two mappings; on a GPU it is a
device-to-device copy. Blocks that are consecutive in both tables go in one copy (a strided
copy over the layers, of the raw bits).
"""

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from duetserve.runtime.kv_pool import KVPool


class TransferError(ValueError):
    """The two pools or the two block tables do not match."""


@dataclass(frozen=True, slots=True)
class Copied:
    blocks: int
    nbytes: int
    seconds: float


def runs(source: Sequence[int], target: Sequence[int]) -> list[tuple[int, int, int]]:
    """(source start, target start, length) of the stretches consecutive in both tables."""
    out: list[tuple[int, int, int]] = []
    for s, t in zip(source, target, strict=True):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == t:
            first_s, first_t, length = out[-1]
            out[-1] = (first_s, first_t, length + 1)
        else:
            out.append((s, t, 1))
    return out


# A pool's bits as integers of its element size: torch copies those at memory speed, while a
# strided bfloat16 copy of the same bytes ran at 4 GB/s here (loadtest/swap_copy.py).
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """[layers x 2, blocks x block elements]: each row one layer's K or V over every block, so
    a run of blocks is one contiguous stretch of each row."""
    return pool.view(_RAW[pool.element_size()]).view(pool.shape[0] * pool.shape[1], -1)


def copy_blocks(
    source: KVPool,
    target: KVPool,
    source_ids: Sequence[int],
    target_ids: Sequence[int],
    stream: "torch.cuda.Stream | None" = None,
) -> Copied:
    """Copy the KV of `source_ids` in `source` into `target_ids` in `target` (all layers).

    On a GPU, with `stream`: the copies go on that stream, asynchronous (DMA, for host memory
    that is pinned: PinnedHostMemory), and only that stream is waited for, not the model's
    kernels. The caller makes sure no kernel still writes the source blocks (a worker copies
    between steps, and every step ends synchronized, its tokens read back) and that none
    reads the target blocks until this returns. Without `stream`, the whole device is."""
    src, dst = source.tensor, target.tensor
    if src.shape[:2] != dst.shape[:2] or src.shape[3:] != dst.shape[3:] or src.dtype != dst.dtype:
        raise TransferError(
            f"pools differ: {tuple(src.shape)} {src.dtype} vs {tuple(dst.shape)} {dst.dtype}"
        )
    if len(source_ids) != len(target_ids):
        raise TransferError(f"{len(source_ids)} source blocks for {len(target_ids)} targets")
    for ids, pool in ((source_ids, source), (target_ids, target)):
        if any(not 0 <= i < pool.num_blocks for i in ids):
            raise TransferError(f"block ids {list(ids)} outside a pool of {pool.num_blocks}")
    started = time.perf_counter()
    src_rows, dst_rows = _rows(src), _rows(dst)
    width = src_rows.shape[1] // source.num_blocks  # elements of one block in one row
    on_device = src.is_cuda or dst.is_cuda
    with torch.cuda.stream(stream) if stream is not None and on_device else nullcontext():
        for s, t, n in runs(source_ids, target_ids):
            stretch = src_rows[:, s * width : (s + n) * width]
            dst_rows[:, t * width : (t + n) * width].copy_(stretch, non_blocking=on_device)
    if stream is not None and on_device:
        stream.synchronize()
    elif on_device:
        torch.cuda.synchronize(dst.device if dst.is_cuda else src.device)
    return Copied(
        len(source_ids), len(source_ids) * source.block_nbytes, time.perf_counter() - started
    )
