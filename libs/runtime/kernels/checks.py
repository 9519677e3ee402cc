"""Argument checks shared by the kernel wrappers. Each refusal is a ShapeError naming the argument,
raised before launch, so a bad call never reaches the GPU and nothing is written."""

from collections.abc import Sequence
from typing import NamedTuple

import torch

from duetserve.runtime.errors import ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


class CacheGeometry(NamedTuple):
    """The dimensions of one layer's paged K/V cache, [num_blocks, block_size, num_kv_heads, D]."""

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    dtype: torch.dtype | Sequence[torch.dtype],
    shape: Sequence[int | None],
    contiguous_last_dim: bool = True,
) -> None:
    """Refuse t unless it has one of the dtypes, len(shape) dims, each size given in shape (None
    matches any size) and, by default, a unit stride in its last dimension."""
    dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ShapeError(f"{name}: dtype {t.dtype}, expected one of {allowed}")
    expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if t.dim() != len(shape):
        raise ShapeError(f"{name}: shape {list(t.shape)}, expected {expected}")
    for size, want in zip(t.shape, shape, strict=True):
        if want is not None and size != want:
            raise ShapeError(f"{name}: shape {list(t.shape)}, expected {expected}")
    if contiguous_last_dim and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ShapeError(f"{name}: last dimension has stride {t.stride(-1)}, expected 1")


def check_power_of_two(name: str, value: int, *, minimum: int = 1) -> None:
    """Refuse a tile dimension that is not a power of two of at least minimum."""
    if value < minimum or value & (value - 1) != 0:
        raise ShapeError(f"{name} is {value}, expected a power of two >= {minimum}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Refuse tensors spread over more than one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ShapeError(f"kernel arguments on different devices: {listed}")


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> CacheGeometry:
    """Refuse a K/V cache pair that is not one layout: same shape, dtype and strides, a float
    dtype, a power-of-two block size and a unit stride along head_dim."""
    check_tensor("k_cache", k_cache, dtype=FLOAT_DTYPES, shape=(None, None, None, None))
    check_tensor("v_cache", v_cache, dtype=k_cache.dtype, shape=tuple(k_cache.shape))
    if k_cache.stride() != v_cache.stride():
        raise ShapeError(
            f"k_cache strides {k_cache.stride()} differ from v_cache strides {v_cache.stride()}"
        )
    geometry = CacheGeometry(*k_cache.shape)
    check_power_of_two("block_size", geometry.block_size)
    return geometry


def check_query_heads(num_q_heads: int, num_kv_heads: int) -> int:
    """The grouped-query group size; refuse query heads that are not a multiple of KV heads."""
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ShapeError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return num_q_heads // num_kv_heads
