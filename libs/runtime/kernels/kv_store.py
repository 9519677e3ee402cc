"""Write a batch of K/V rows into the paged cache: token t lands at slot slot_mapping[t], that is
block slot // block_size, row slot % block_size. Slots are trusted: the caller validates them."""

import torch
import triton
import triton.language as tl

from duetserve.runtime.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_kv_cache,
    check_same_device,
    check_tensor,
)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_cache_block,
    stride_cache_row,
    stride_cache_head,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (token, kv head): copies one row of D values into K and into V.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim

    key_offsets = token * stride_key_t + head * stride_key_h + offs_d  # [D]
    value_offsets = token * stride_value_t + head * stride_value_h + offs_d  # [D]
    key = tl.load(key_ptr + key_offsets, mask=mask_d)
    value = tl.load(value_ptr + value_offsets, mask=mask_d)
    cache_offsets = (
        (slot // BLOCK_SIZE) * stride_cache_block
        + (slot % BLOCK_SIZE) * stride_cache_row
        + head * stride_cache_head
        + offs_d
    )
    tl.store(k_cache_ptr + cache_offsets, key.to(k_cache_ptr.dtype.element_ty), mask=mask_d)
    tl.store(v_cache_ptr + cache_offsets, value.to(v_cache_ptr.dtype.element_ty), mask=mask_d)


def store_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    slot_mapping: torch.Tensor,  # int32 | int64 [T]
) -> None:
    """Write key[t] and value[t], cast to the cache dtype, at slot slot_mapping[t], in place."""
    _, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    check_tensor("key", key, dtype=FLOAT_DTYPES, shape=(None, num_kv_heads, head_dim))
    check_tensor("value", value, dtype=FLOAT_DTYPES, shape=tuple(key.shape))
    num_tokens = key.shape[0]
    check_tensor("slot_mapping", slot_mapping, dtype=INDEX_DTYPES, shape=(num_tokens,))
    check_same_device(
        key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
