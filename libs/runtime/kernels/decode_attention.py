"""Decode attention over the paged KV cache: one query token per sequence, at position
seq_lens[b] - 1, attending to all seq_lens[b] cached keys (the token's own K/V already stored).

One program per (sequence, query head) walks the sequence's block table one cache block at a
time, with an online softmax in float32. Equals attention_ref.paged_attention_ref with one query
row per sequence. The caller guarantees seq_lens[b] >= 1 and block tables naming
ceil(seq_lens[b] / block_size) valid blocks.
"""

import torch
import triton
import triton.language as tl

from duetserve.runtime.kernels.checks import (
    check_kv_cache,
    check_power_of_two,
    check_query_heads,
    check_same_device,
    check_tensor,
)

LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    query_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qk_scale,
    stride_out_b,
    stride_out_h,
    stride_query_b,
    stride_query_h,
    stride_cache_block,
    stride_cache_row,
    stride_cache_head,
    stride_table_b,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    kv_head = head // GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_row = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM)

    # q carries the softmax scale and log2(e), so exp2 below is exp of the scaled score.
    q = tl.load(query_ptr + seq * stride_query_b + head * stride_query_h + offs_d)  # [D]
    q = q.to(tl.float32) * qk_scale
    table_row = block_tables_ptr + seq * stride_table_b
    row_offsets = offs_row[:, None] * stride_cache_row + kv_head * stride_cache_head  # [bs, 1]

    m_i = -float("inf")  # running max of scores
    l_i = 0.0  # running sum of exp2(score - m_i)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for block in range(0, tl.cdiv(seq_len, BLOCK_SIZE)):
        block_id = tl.load(table_row + block).to(tl.int64)
        key_mask = block * BLOCK_SIZE + offs_row < seq_len  # [bs]
        offsets = block_id * stride_cache_block + row_offsets + offs_d[None, :]  # [bs, D]
        k = tl.load(k_cache_ptr + offsets, mask=key_mask[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[None, :] * k, axis=1)  # [bs]
        scores = tl.where(key_mask, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)  # [bs]
        v = tl.load(v_cache_ptr + offsets, mask=key_mask[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    out = acc / l_i
    tl.store(
        out_ptr + seq * stride_out_b + head * stride_out_h + offs_d,
        out.to(out_ptr.dtype.element_ty),
    )


def paged_decode_attention(
    query: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    seq_lens: torch.Tensor,  # int32 [B]
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of each sequence's newest token over its whole cached context."""
    _, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    check_power_of_two("head_dim", head_dim)
    check_tensor("query", query, dtype=k_cache.dtype, shape=(None, None, head_dim))
    num_seqs, num_q_heads, _ = query.shape
    group = check_query_heads(num_q_heads, num_kv_heads)
    check_tensor("block_tables", block_tables, dtype=torch.int32, shape=(num_seqs, None))
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(num_seqs,))
    check_same_device(
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=seq_lens,
    )
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # [B, Hq, D]
    if num_seqs == 0:
        return out
    _paged_decode_kernel[(num_seqs, num_q_heads)](
        out,
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        scale * LOG2E,
        out.stride(0),
        out.stride(1),
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
    )
    return out
