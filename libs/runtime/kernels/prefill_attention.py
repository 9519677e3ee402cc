"""Prefill attention over the paged KV cache, for prefill, chunked prefill and mixed batches.

Sequence b owns query rows query_start_loc[b]:query_start_loc[b + 1], the last n_b tokens of a
context of seq_lens[b] tokens whose K/V (the chunk's own included) are already in the cache.
Row i sits at position seq_lens[b] - n_b + i and attends causally to keys 0..that position;
given `positions` (a scattered batch: KVShare's selective recomputation), row t sits at
positions[t] instead, the rows of a sequence increasing and its last at seq_lens[b] - 1.

One program per (tile of BLOCK_M query rows of one sequence, query head), flash-attention
style: key tiles of BLOCK_N positions are gathered through the block table, scores and values go
through tl.dot, the softmax is online in float32, and key tiles past the query tile's last
position are never read. Equals attention_ref.paged_attention_ref.

The caller guarantees what the wrapper cannot check without a device sync: max_query_len >= every
n_b (rows past it are left unwritten), seq_lens[b] >= n_b >= 1, and block tables naming
ceil(seq_lens[b] / block_size) valid blocks.
"""

import torch
import triton
import triton.language as tl

from duetserve.runtime.errors import ShapeError
from duetserve.runtime.kernels.checks import (
    check_kv_cache,
    check_power_of_two,
    check_query_heads,
    check_same_device,
    check_tensor,
)

LOG2E = 1.4426950408889634
BLOCK_N = 32  # key positions per tile
MAX_BLOCK_M = 64  # query rows per tile
MIN_DOT_DIM = 16  # tl.dot needs every dimension >= 16
# Read when @triton.jit below is, so it says whether the kernels run on the Triton interpreter.
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # The interpreter's tl.dot (triton 3.9) multiplies bfloat16 operands as raw bits; UPCAST, set
    # only there, feeds it float32 holding the same values. A GPU gets the operands as they are.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _paged_prefill_kernel(
    out_ptr,
    query_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    positions_ptr,
    qk_scale,
    tiles_per_seq,
    stride_out_t,
    stride_out_h,
    stride_query_t,
    stride_query_h,
    stride_cache_block,
    stride_cache_row,
    stride_cache_head,
    stride_table_b,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    SCATTERED: tl.constexpr,
):
    seq = (tl.program_id(0) // tiles_per_seq).to(tl.int64)
    tile = tl.program_id(0) % tiles_per_seq
    head = tl.program_id(1).to(tl.int64)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if tile * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_start = seq_len - query_len  # position of the chunk's first row

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # row index within the chunk
    row_mask = offs_m < query_len
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (query_start + offs_m).to(tl.int64)
    if SCATTERED:
        q_pos = tl.load(positions_ptr + rows, mask=row_mask, other=0).to(tl.int32)
        last_pos = tl.max(q_pos, axis=0)  # rows increase: the tile's last row
    else:
        q_pos = context_start + offs_m  # [M] absolute positions
        last_pos = context_start + (tile + 1) * BLOCK_M - 1
    q = tl.load(
        query_ptr + rows[:, None] * stride_query_t + head * stride_query_h + offs_d[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )  # [M, D]

    table_row = block_tables_ptr + seq * stride_table_b
    head_offset = (head // GROUP) * stride_cache_head
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Keys past the tile's last row are masked for every row: stop there.
    kv_end = tl.minimum(seq_len, last_pos + 1)
    for kv_start in range(0, kv_end, BLOCK_N):
        offs_n = kv_start + tl.arange(0, BLOCK_N)  # key positions
        key_mask = offs_n < kv_end
        block_ids = tl.load(table_row + offs_n // BLOCK_SIZE, mask=key_mask, other=0)
        kv_offsets = (
            block_ids.to(tl.int64)[:, None] * stride_cache_block
            + (offs_n % BLOCK_SIZE)[:, None] * stride_cache_row
            + head_offset
            + offs_d[None, :]
        )  # [N, D]
        k = tl.load(k_cache_ptr + kv_offsets, mask=key_mask[:, None], other=0.0)
        scores = _dot(q, tl.trans(k), UPCAST_DOT) * qk_scale  # [M, N]
        visible = (offs_n[None, :] <= q_pos[:, None]) & key_mask[None, :]
        scores = tl.where(visible, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)  # [M]
        p = tl.exp2(scores - m_new[:, None])  # [M, N]
        v = tl.load(v_cache_ptr + kv_offsets, mask=key_mask[:, None], other=0.0)
        pv = _dot(p.to(v.dtype), v, UPCAST_DOT)  # [M, D]
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_out_t + head * stride_out_h + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )


def _query_tile_rows(max_query_len: int) -> int:
    """Rows per query tile: the longest chunk rounded up to a power of two, within [16, 64]."""
    return min(MAX_BLOCK_M, max(MIN_DOT_DIM, triton.next_power_of_2(max_query_len)))


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    seq_lens: torch.Tensor,  # int32 [B]
    scale: float,
    max_query_len: int,
    positions: torch.Tensor | None = None,  # int64 [T]: each row's position, when scattered
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's query chunk over its cached context and itself."""
    _, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    check_power_of_two("head_dim", head_dim, minimum=MIN_DOT_DIM)
    check_tensor("query", query, dtype=k_cache.dtype, shape=(None, None, head_dim))
    num_tokens, num_q_heads, _ = query.shape
    group = check_query_heads(num_q_heads, num_kv_heads)
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(None,))
    num_seqs = seq_lens.shape[0]
    check_tensor("block_tables", block_tables, dtype=torch.int32, shape=(num_seqs, None))
    check_tensor("query_start_loc", query_start_loc, dtype=torch.int32, shape=(num_seqs + 1,))
    if positions is not None:
        check_tensor("positions", positions, dtype=torch.int64, shape=(num_tokens,))
        check_same_device(query=query, positions=positions)
    check_same_device(
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
    )
    if num_tokens > 0 and not 1 <= max_query_len <= num_tokens:
        raise ShapeError(f"max_query_len is {max_query_len}, expected 1..{num_tokens} (= T)")
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # [T, Hq, D]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m = _query_tile_rows(max_query_len)
    tiles_per_seq = triton.cdiv(max_query_len, block_m)
    _paged_prefill_kernel[(num_seqs * tiles_per_seq, num_q_heads)](
        out,
        query,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        seq_lens if positions is None else positions,  # not read unless SCATTERED
        scale * LOG2E,
        tiles_per_seq,
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
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        UPCAST_DOT=INTERPRETED and query.dtype == torch.bfloat16,
        SCATTERED=positions is not None,
    )
    return out
