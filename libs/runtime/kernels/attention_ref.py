"""Torch reference for attention over a paged KV cache: the oracle every kernel is tested against.

Cache layout, one layer:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset_in_block

A batch holds B sequences. Sequence b owns the query rows query_start_loc[b]:query_start_loc[b+1];
they are the last n_b tokens of a context of seq_lens[b] tokens whose K/V are already stored in
the cache at the slots its block table names. Query row i of sequence b sits at position
seq_lens[b] - n_b + i and attends to keys 0..that position (causal). Prefill, chunked prefill,
decode (n_b == 1) and mixed batches are all this one computation. Given `positions` (a scattered
batch: KVShare's selective recomputation), row t sits at positions[t] instead.

Written for clarity, not speed: one sequence at a time, in float32.
"""

import torch


def store_kv_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    slot_mapping: torch.Tensor,  # int [T]
) -> None:
    """Write each token's K/V at its slot."""
    block_size = k_cache.shape[1]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor").long()
    offsets = (slot_mapping % block_size).long()
    k_cache[blocks, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, offsets] = value.to(v_cache.dtype)


def gather_context(
    cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_table: torch.Tensor,  # int [max_blocks]
    context_len: int,
) -> torch.Tensor:  # [context_len, Hkv, D]
    """The first context_len cached rows of one sequence, in position order."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, bs, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:context_len]


def paged_attention_ref(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # int [B, max_blocks]
    query_start_loc: torch.Tensor,  # int [B + 1]
    seq_lens: torch.Tensor,  # int [B]
    scale: float,
    positions: torch.Tensor | None = None,  # int [T]: each row's position, when scattered
) -> torch.Tensor:  # [T, Hq, D]
    num_q_heads = query.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for b, context_len in enumerate(seq_lens.tolist()):
        q = query[starts[b] : starts[b + 1]].float()  # [n, Hq, D]
        n = q.shape[0]
        k = gather_context(k_cache, block_tables[b], context_len).float()  # [S, Hkv, D]
        v = gather_context(v_cache, block_tables[b], context_len).float()
        k = k.repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,shd->hqs", q, k) * scale  # [Hq, n, S]
        if positions is None:
            q_pos = torch.arange(context_len - n, context_len, device=query.device).unsqueeze(1)
        else:
            q_pos = positions[starts[b] : starts[b + 1]].long().unsqueeze(1)  # [n, 1]
        k_pos = torch.arange(context_len, device=query.device).unsqueeze(0)  # [1, S]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[b] : starts[b + 1]] = torch.einsum("hqs,shd->qhd", probs, v).to(query.dtype)
    return out
