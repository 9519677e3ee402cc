"""disagg mode's KV copy: blocks of one pool into blocks of another, every layer, K and V."""

import pytest
import torch

from duetserve.runtime.kv_pool import KVPool
from duetserve.services.unit_worker.kv_transfer import (
    TransferError,
    copy_blocks,
    runs,
)

LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 4, 2, 4
BLOCK_BYTES = LAYERS * 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 4  # float32


def _pool(num_blocks: int, dtype: torch.dtype = torch.float32) -> KVPool:
    return KVPool(torch.zeros(LAYERS, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype))


def _pools(source_blocks: int, target_blocks: int) -> tuple[KVPool, KVPool]:
    source = _pool(source_blocks)
    source.tensor.copy_(torch.randn(source.tensor.shape))
    return source, _pool(target_blocks)


def test_runs_group_blocks_consecutive_in_both_tables() -> None:
    assert runs([3, 4, 5, 9], [0, 1, 2, 3]) == [(3, 0, 3), (9, 3, 1)]
    assert runs([1, 2], [5, 7]) == [(1, 5, 1), (2, 7, 1)]
    assert runs([], []) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_copies_are_bit_for_bit_in_every_dtype(dtype: torch.dtype) -> None:
    """The copy moves raw bits (as integers of the element's size): NaNs, infinities and
    negative zeros come through as they were."""
    source, target = _pool(6, dtype), _pool(6, dtype)
    source.tensor.copy_(torch.randn(source.tensor.shape))
    specials = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")], dtype=dtype)
    source.tensor[1, 1, 2, 0, 0, :4] = specials
    copy_blocks(source, target, [1, 2, 3], [3, 4, 5])  # one run
    copy_blocks(source, target, [5], [0])
    as_bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    moved = target.tensor[:, :, [3, 4, 5, 0]].view(as_bits)
    assert torch.equal(moved, source.tensor[:, :, [1, 2, 3, 5]].view(as_bits))


def test_copied_blocks_hold_the_source_kv_and_nothing_else_changes() -> None:
    source, target = _pools(10, 8)
    source_ids, target_ids = [7, 8, 2, 3], [0, 1, 5, 4]
    copied = copy_blocks(source, target, source_ids, target_ids)
    for s, t in zip(source_ids, target_ids, strict=True):
        assert torch.equal(target.tensor[:, :, t], source.tensor[:, :, s])
    untouched = [b for b in range(8) if b not in target_ids]
    assert not target.tensor[:, :, untouched].any()
    assert source.block_nbytes == BLOCK_BYTES
    assert (copied.blocks, copied.nbytes) == (4, 4 * BLOCK_BYTES)
    assert copied.seconds >= 0


def test_mismatched_pools_and_tables_are_refused() -> None:
    source, target = _pools(4, 4)
    with pytest.raises(TransferError, match="2 source blocks for 1"):
        copy_blocks(source, target, [0, 1], [0])
    with pytest.raises(TransferError, match="outside a pool of 4"):
        copy_blocks(source, target, [4], [0])
    with pytest.raises(TransferError, match="pools differ"):
        copy_blocks(source, _pool(4, torch.bfloat16), [0], [0])
