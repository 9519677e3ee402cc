"""How far reused KV is from the KV the new prompt would compute (KVShare's selective
recomputation): per reused token, the squared distance between its K/V in the cache (placed
there from another prompt: kv_place.py) and its K/V freshly computed at a check layer; the
tokens that deviate most are the ones to recompute in the layers after it.

A reused token's K/V at layer 0 depend on the token alone (its position is turned in exactly),
so deviation starts at layer 1, where the token has attended to a context that differs from
the one it was cached in; the caller picks the check layer and computes the fresh rows there.
"""

import math

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
def _kv_deviation_kernel(
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    k_fresh_ptr,
    v_fresh_ptr,
    out_ptr,
    stride_cache_block,
    stride_cache_row,
    stride_cache_head,
    stride_fresh_t,
    stride_fresh_h,
    num_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token: the sum over its heads of |K - K'|^2 + |V - V'|^2, in float32.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < head_dim
    row = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_row
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for head in range(num_heads):
        cached = row + head * stride_cache_head + offs
        fresh = token * stride_fresh_t + head * stride_fresh_h + offs
        k = tl.load(k_cache_ptr + cached, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_fresh_ptr + fresh, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + cached, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(v_fresh_ptr + fresh, mask=mask, other=0.0).to(tl.float32)
        total += (k - k2) * (k - k2) + (v - v2) * (v - v2)
    tl.store(out_ptr + token, tl.sum(total, axis=0))


def _check(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_fresh: torch.Tensor,
    v_fresh: torch.Tensor,
) -> tuple[int, int, int]:
    _, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    num_tokens = slots.shape[0] if slots.dim() == 1 else -1
    check_tensor("slots", slots, dtype=INDEX_DTYPES, shape=(num_tokens,))
    shape = (num_tokens, num_kv_heads, head_dim)
    check_tensor("k_fresh", k_fresh, dtype=FLOAT_DTYPES, shape=shape)
    check_tensor("v_fresh", v_fresh, dtype=FLOAT_DTYPES, shape=shape)
    # One stride serves both (a dimension of size 1 has none that matters).
    if any(
        n > 1 and a != b for n, a, b in zip(shape, k_fresh.stride(), v_fresh.stride(), strict=True)
    ):
        raise ShapeError("k_fresh and v_fresh: different strides")
    check_same_device(
        k_cache=k_cache, v_cache=v_cache, slots=slots, k_fresh=k_fresh, v_fresh=v_fresh
    )
    return block_size, num_kv_heads, head_dim


def kv_deviation_triton(
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]: the reused tokens' K, placed
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    slots: torch.Tensor,  # int32 | int64 [T]: where each reused token's K/V are
    k_fresh: torch.Tensor,  # [T, Hkv, D]: the same tokens' K computed in the new context
    v_fresh: torch.Tensor,  # [T, Hkv, D]
) -> torch.Tensor:
    """Each token's squared distance, float32 [T]. The GPU path (tested in the interpreter)."""
    block_size, num_kv_heads, head_dim = _check(k_cache, v_cache, slots, k_fresh, v_fresh)
    out = torch.empty(slots.shape[0], dtype=torch.float32, device=slots.device)
    if slots.shape[0] == 0:
        return out
    _kv_deviation_kernel[(slots.shape[0],)](
        k_cache,
        v_cache,
        slots,
        k_fresh,
        v_fresh,
        out,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_fresh.stride(0),
        k_fresh.stride(1),
        num_kv_heads,
        head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out


def kv_deviation_cpu(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_fresh: torch.Tensor,
    v_fresh: torch.Tensor,
) -> torch.Tensor:
    """The same, as whole-batch torch operations."""
    block_size, _, _ = _check(k_cache, v_cache, slots, k_fresh, v_fresh)
    index = slots.long()
    blocks, rows = index // block_size, index % block_size
    dk = k_cache[blocks, rows].float() - k_fresh.float()
    dv = v_cache[blocks, rows].float() - v_fresh.float()
    return (dk * dk).sum(dim=(1, 2)) + (dv * dv).sum(dim=(1, 2))


def kv_deviation_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_fresh: torch.Tensor,
    v_fresh: torch.Tensor,
) -> torch.Tensor:
    """The reference: one token at a time, in float64."""
    block_size, _, _ = _check(k_cache, v_cache, slots, k_fresh, v_fresh)
    out = []
    for t, slot in enumerate(slots.tolist()):
        where = divmod(slot, block_size)
        dk = k_cache[where].double() - k_fresh[t].double()
        dv = v_cache[where].double() - v_fresh[t].double()
        out.append(float((dk * dk).sum() + (dv * dv).sum()))
    return torch.tensor(out, dtype=torch.float32)


def kv_deviation(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_fresh: torch.Tensor,
    v_fresh: torch.Tensor,
) -> torch.Tensor:
    """The path for the cache's device: Triton on a GPU, torch on the CPU."""
    deviation = kv_deviation_triton if k_cache.is_cuda else kv_deviation_cpu
    return deviation(k_cache, v_cache, slots, k_fresh, v_fresh)


def to_recompute(deviation: torch.Tensor, fraction: float) -> torch.Tensor:
    """The indices of the ceil(fraction x T) tokens that deviate most, ascending (0: none;
    1: all). Ties go to the earlier token."""
    if not 0.0 <= fraction <= 1.0:
        raise ShapeError(f"fraction {fraction} outside [0, 1]")
    count = math.ceil(fraction * deviation.shape[0])
    if count == 0:
        return torch.empty(0, dtype=torch.long, device=deviation.device)
    order = torch.sort(deviation, descending=True, stable=True).indices
    return order[:count].sort().values
