"""Reused KV placed at new positions (KVShare): the K/V of cached tokens copied into other slots
of the paged cache, each key turned by its token's change of position, each value as it is.

RoPE turns every pair (x_i, x_{i + D/2}) of a key (the half-split form: layers/rotary.py) by
the angle position x inv_freq_i. Turns add, so a key computed at position p is the key at
p + delta once turned by delta x inv_freq_i: nothing is recomputed. That holds for every RoPE
variant the runtime supports, since each only sets inv_freq (Llama 3's scaling rescales
frequencies; the angle stays linear in the position). What it cannot restore is the rest of
the context: a token's K/V in layers after the first also depend on what came before it,
which is what selective recomputation is for.

Slots are trusted to lie in the cache (the caller's block tables); that a destination is no
source and no destination is written twice is checked, since every token is one program and
programs run in no order.
"""

import torch
import triton
import triton.language as tl

from duetserve.runtime.errors import ShapeError
from duetserve.runtime.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_kv_cache,
    check_same_device,
    check_tensor,
)


@triton.jit
def _place_kv_kernel(
    k_cache_ptr,
    v_cache_ptr,
    src_slots_ptr,
    dst_slots_ptr,
    deltas_ptr,
    inv_freq_ptr,
    stride_cache_block,
    stride_cache_row,
    stride_cache_head,
    half_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per (token, kv head): one row of D values out of K and V, K turned.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    src = tl.load(src_slots_ptr + token).to(tl.int64)
    dst = tl.load(dst_slots_ptr + token).to(tl.int64)
    delta = tl.load(deltas_ptr + token).to(tl.float32)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < half_dim
    inv_freq = tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)
    angle = delta * inv_freq
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    head_offset = head * stride_cache_head
    src_row = (src // BLOCK_SIZE) * stride_cache_block + (src % BLOCK_SIZE) * stride_cache_row
    dst_row = (dst // BLOCK_SIZE) * stride_cache_block + (dst % BLOCK_SIZE) * stride_cache_row
    src_offsets = src_row + head_offset + offs
    dst_offsets = dst_row + head_offset + offs
    x1 = tl.load(k_cache_ptr + src_offsets, mask=mask).to(tl.float32)
    x2 = tl.load(k_cache_ptr + src_offsets + half_dim, mask=mask).to(tl.float32)
    v1 = tl.load(v_cache_ptr + src_offsets, mask=mask)
    v2 = tl.load(v_cache_ptr + src_offsets + half_dim, mask=mask)
    out_dtype = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + dst_offsets, (x1 * cos - x2 * sin).to(out_dtype), mask=mask)
    tl.store(k_cache_ptr + dst_offsets + half_dim, (x2 * cos + x1 * sin).to(out_dtype), mask=mask)
    tl.store(v_cache_ptr + dst_offsets, v1, mask=mask)
    tl.store(v_cache_ptr + dst_offsets + half_dim, v2, mask=mask)


def check_place(
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    src_slots: torch.Tensor,  # int32 | int64 [T]
    dst_slots: torch.Tensor,  # int32 | int64 [T]
    deltas: torch.Tensor,  # int32 | int64 [T]: new position - old position
    inv_freq: torch.Tensor,  # float32 [D / 2]
) -> tuple[int, int, int]:
    """Refuse a bad call before anything is written (ShapeError); (block size, kv heads, D)."""
    _, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    if head_dim % 2:
        raise ShapeError(f"head_dim {head_dim} is odd: RoPE turns pairs")
    num_tokens = src_slots.shape[0] if src_slots.dim() == 1 else -1
    for name, t in (("src_slots", src_slots), ("dst_slots", dst_slots), ("deltas", deltas)):
        check_tensor(name, t, dtype=INDEX_DTYPES, shape=(num_tokens,))
    check_tensor("inv_freq", inv_freq, dtype=torch.float32, shape=(head_dim // 2,))
    check_same_device(
        k_cache=k_cache,
        v_cache=v_cache,
        src_slots=src_slots,
        dst_slots=dst_slots,
        deltas=deltas,
        inv_freq=inv_freq,
    )
    if k_cache.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"k_cache: dtype {k_cache.dtype}, expected a float dtype")
    if num_tokens:
        if torch.unique(dst_slots).numel() != num_tokens:
            raise ShapeError("dst_slots: a slot written twice")
        if bool(torch.isin(dst_slots, src_slots).any()):
            raise ShapeError("dst_slots: a destination is also a source")
    return block_size, num_kv_heads, head_dim


def place_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    deltas: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    """In place: K/V of slot src_slots[t] into slot dst_slots[t], K turned by deltas[t]
    positions (check_place's shapes). The GPU path (tested in Triton's interpreter)."""
    block_size, num_kv_heads, head_dim = check_place(
        k_cache, v_cache, src_slots, dst_slots, deltas, inv_freq
    )
    num_tokens = src_slots.shape[0]
    if num_tokens == 0:
        return
    _place_kv_kernel[(num_tokens, num_kv_heads)](
        k_cache,
        v_cache,
        src_slots,
        dst_slots,
        deltas,
        inv_freq,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        head_dim // 2,
        BLOCK_SIZE=block_size,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
    )


def place_kv_cpu(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    deltas: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    """The same as place_kv_triton, as a few whole-batch torch operations: every source row
    gathered at once, turned in float32, written at once."""
    block_size, _, head_dim = check_place(k_cache, v_cache, src_slots, dst_slots, deltas, inv_freq)
    if src_slots.shape[0] == 0:
        return
    src, dst = src_slots.long(), dst_slots.long()
    src_block, src_row = src // block_size, src % block_size
    dst_block, dst_row = dst // block_size, dst % block_size
    keys = k_cache[src_block, src_row].float()  # [T, Hkv, D]
    angle = deltas.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    half = head_dim // 2
    x1, x2 = keys[..., :half], keys[..., half:]
    turned = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    k_cache[dst_block, dst_row] = turned.to(k_cache.dtype)
    v_cache[dst_block, dst_row] = v_cache[src_block, src_row]


def place_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    deltas: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    """The path for the cache's device: Triton on a GPU, torch on the CPU."""
    place = place_kv_triton if k_cache.is_cuda else place_kv_cpu
    place(k_cache, v_cache, src_slots, dst_slots, deltas, inv_freq)


def place_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    deltas: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    """The reference: one token at a time, the turn in float64."""
    block_size, _, head_dim = check_place(k_cache, v_cache, src_slots, dst_slots, deltas, inv_freq)
    half = head_dim // 2
    for src, dst, delta in zip(
        src_slots.tolist(), dst_slots.tolist(), deltas.tolist(), strict=True
    ):
        source, target = divmod(src, block_size), divmod(dst, block_size)
        key = k_cache[source].double()  # [Hkv, D]
        angle = delta * inv_freq.double()
        cos, sin = angle.cos(), angle.sin()
        x1, x2 = key[:, :half], key[:, half:]
        turned = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        k_cache[target] = turned.to(k_cache.dtype)
        v_cache[target] = v_cache[source]
