"""Shared fixtures of the kernel tests: paged caches whose unused slots hold NaN."""

import torch

from duetserve.runtime.kernels.attention_ref import store_kv_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def build_paged_cache(
    seq_lens: list[int], block_size: int, num_kv_heads: int, dtype: torch.dtype, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_tables) on the CPU: random K/V for each sequence, in shuffled
    blocks. Every slot no sequence owns, spare blocks and block tails included, holds NaN: a
    kernel that reads one returns NaN."""
    blocks_per_seq = [-(-seq_len // block_size) for seq_len in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)  # [N, bs, Hkv, D]
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    free_blocks = torch.randperm(num_blocks).tolist()
    for b, seq_len in enumerate(seq_lens):
        owned = [free_blocks.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, : len(owned)] = torch.tensor(owned, dtype=torch.int32)
        positions = torch.arange(seq_len)
        blocks = block_tables[b, positions // block_size].long()
        slots = blocks * block_size + positions % block_size  # [S]
        rows = torch.randn(2, seq_len, num_kv_heads, head_dim)  # [2, S, Hkv, D]
        store_kv_ref(rows[0], rows[1], k_cache, v_cache, slots)
    return k_cache, v_cache, block_tables


def random_query(
    num_tokens: int, num_q_heads: int, dtype: torch.dtype, head_dim: int
) -> torch.Tensor:
    """Query [T, Hq, D], strided as the Q part of a fused qkv projection."""
    qkv = torch.randn(num_tokens, 2 * num_q_heads, head_dim, device=DEVICE).to(dtype)
    return qkv[:, :num_q_heads]


def on_device(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: t.to(DEVICE) for name, t in tensors.items()}
