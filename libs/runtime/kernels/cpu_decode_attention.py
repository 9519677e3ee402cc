"""Attention over the paged KV cache on the CPU, by the C kernels of cpu/paged_decode.c (compiled
at first use by cpu/build.py), which read K/V rows where they lie in the pool and keep an online
softmax in float32. They take float32 and bfloat16 caches and any head_dim that is a multiple of
16, and run on torch.get_num_threads() threads of torch's own OpenMP runtime.

Decode: one query token per sequence, at position seq_lens[b] - 1, attending to all seq_lens[b]
cached keys (the token's own K/V already stored). All q heads of a KV group are served from one
read of each row. OpenMP work items are whole sequences (their blocks then read in address
order), or parts of their kv heads when sequences are too few for the threads. Equals
attention_ref.paged_attention_ref with one query row per sequence.

Prefill: the last n tokens of one sequence's context (or n tokens at given increasing
positions: KVShare's selective recomputation), each attending causally to the positions up to
its own, with the same tile functions: a work item is one kv head and a tile of query tokens,
whose q heads score each key tile from one read of its rows. Equals
attention_ref.paged_attention_ref for that sequence.

`cpu_kernels_available` says whether the kernels could be built here and, if not, why; callers
keep a torch path for that case.
"""

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from duetserve.runtime.errors import BlockTableError, ShapeError
from duetserve.runtime.kernels.checks import (
    CacheGeometry,
    check_kv_cache,
    check_query_heads,
    check_same_device,
    check_tensor,
)
from duetserve.runtime.kernels.cpu.build import CompilerOptions, KernelUnavailable, load_library

SOURCE = Path(__file__).parent / "cpu" / "paged_decode.c"
DEFAULT_OPTIONS = CompilerOptions()
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the C side's DTYPE_* values
LANES = 16  # head_dim must be a multiple of the kernel's vector width
MAX_GROUP_ELEMENTS = 1 << 15  # group * head_dim: the C side's MAX_ITEM_FLOATS
STATUS_ERRORS = {
    1: "the kernel refused its arguments",
    2: "seq_lens: a length outside 1 .. block_tables.shape[1] * block_size",
    3: "block_tables: a block id outside the pool",
}
# out, query, k_cache, v_cache, block_tables, seq_lens; 15 sizes and strides; scale, dtype, threads
_ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 15 + [ctypes.c_float] + [ctypes.c_int32] * 2
# out, query, k_cache, v_cache, block_table; 15 sizes and strides; scale, dtype, threads
_PREFILL_ARGTYPES = (
    [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 15 + [ctypes.c_float] + [ctypes.c_int32] * 2
)
MAX_PREFILL_GROUP_ELEMENTS = 1 << 14  # group * head_dim: the C side's MAX_PREFILL_ITEM_FLOATS

_log = logging.getLogger(__name__)


class KernelLoad(NamedTuple):
    function: Callable[..., int] | None  # the decode entry point; None when unavailable
    reason: str  # where it was loaded from, or why it is unavailable
    prefill: Callable[..., int] | None = None  # the prefill entry point, from the same library


@functools.cache
def load_decode_kernel(options: CompilerOptions = DEFAULT_OPTIONS) -> KernelLoad:
    """The compiled kernel, built on the first call for these options; logs the outcome once."""
    try:
        library = load_library(SOURCE, options)
    except KernelUnavailable as error:
        _log.warning("CPU decode attention kernel unavailable: %s", error)
        return KernelLoad(None, f"unavailable: {error}")
    function = library.paged_decode_attention
    function.argtypes = _ARGTYPES
    function.restype = ctypes.c_int
    prefill = library.paged_prefill_attention
    prefill.argtypes = _PREFILL_ARGTYPES
    prefill.restype = ctypes.c_int
    _log.info("CPU attention kernels loaded from %s", library._name)
    return KernelLoad(function, f"loaded from {library._name}", prefill)


def cpu_kernels_available(options: CompilerOptions = DEFAULT_OPTIONS) -> tuple[bool, str]:
    """(True, where it was loaded from), or (False, "unavailable: <reason>")."""
    load = load_decode_kernel(options)
    return load.function is not None, load.reason


def cpu_paged_decode_attention(
    query: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    seq_lens: torch.Tensor,  # int32 [B]
    scale: float,
    *,
    num_threads: int | None = None,
    options: CompilerOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:  # [B, Hq, D]
    """Raises ShapeError on a bad argument, BlockTableError on a length or block id that points
    outside the table or pool, KernelUnavailable when the kernel cannot be built here."""
    call = PagedDecodeCall(
        query, k_cache, v_cache, block_tables, seq_lens, scale, num_threads, options
    )
    return call(query, k_cache, v_cache)


class PagedDecodeCall:
    """The kernel's arguments checked once, for every layer of a forward pass: the layers' caches
    are views of one pool with one layout, and their queries come from one projection, so a
    layer's call passes only its tensors' addresses (the checks cost ~30 us, a tenth of a
    batch-1 layer's attention). A call whose tensors are laid out otherwise than the checked
    ones is refused, never run. block_tables and seq_lens are held, as checked, for all calls."""

    def __init__(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        num_threads: int | None = None,
        options: CompilerOptions = DEFAULT_OPTIONS,
    ) -> None:
        geometry = _check_arguments(query, k_cache, v_cache, block_tables, seq_lens)
        kernel = load_decode_kernel(options)
        if kernel.function is None:
            raise KernelUnavailable(kernel.reason)
        self._function = kernel.function
        self._layout = _layout(query, k_cache, v_cache)
        self._shape = query.shape
        self._dtype = query.dtype
        self._tables = block_tables, seq_lens  # kept alive: the kernel reads their addresses
        self._arguments = (
            block_tables.data_ptr(),
            seq_lens.data_ptr(),
            query.shape[0],
            geometry.num_kv_heads,
            query.shape[1] // geometry.num_kv_heads,
            geometry.head_dim,
            geometry.num_blocks,
            geometry.block_size,
            block_tables.shape[1],
            query.shape[1] * query.shape[2],  # the strides of the contiguous output
            query.shape[2],
            *query.stride()[:2],
            *k_cache.stride()[:3],
            block_tables.stride(0),
            scale,
            DTYPE_CODES[query.dtype],
            torch.get_num_threads() if num_threads is None else num_threads,
        )

    def __call__(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:  # [B, Hq, D]
        if _layout(query, k_cache, v_cache) != self._layout:
            raise ShapeError("query, k_cache or v_cache laid out otherwise than when checked")
        out = torch.empty(self._shape, dtype=self._dtype)
        status = self._function(
            out.data_ptr(),
            query.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            *self._arguments,
        )
        if status == 1:
            raise ShapeError(STATUS_ERRORS[status])
        if status != 0:
            raise BlockTableError(STATUS_ERRORS[status])
        return out


def _layout(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[object, ...]:
    """What the checks and the kernel's strides depend on, for each tensor of a layer."""
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in (query, k_cache, v_cache))


def _check_arguments(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> CacheGeometry:
    check_same_device(block_tables=block_tables, seq_lens=seq_lens, query=query)
    geometry, _ = _check_query_and_cache(query, k_cache, v_cache, MAX_GROUP_ELEMENTS)
    num_seqs = query.shape[0]
    check_tensor("block_tables", block_tables, dtype=torch.int32, shape=(num_seqs, None))
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(num_seqs,))
    return geometry


def _check_query_and_cache(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, max_group_elements: int
) -> tuple[CacheGeometry, int]:
    """The checks both kernels share: a CPU query of the cache's dtype and head_dim, a cache of
    a dtype and head_dim the kernels take, and no more q heads a kv head than an item holds.
    Returns the cache's geometry and the group size."""
    check_same_device(query=query, k_cache=k_cache, v_cache=v_cache)
    if query.device.type != "cpu":
        raise ShapeError(f"query: on {query.device}, the kernel runs on the CPU")
    geometry = check_kv_cache(k_cache, v_cache)
    if k_cache.dtype not in DTYPE_CODES:
        raise ShapeError(f"k_cache: dtype {k_cache.dtype}, expected float32 or bfloat16")
    if geometry.head_dim % LANES != 0:
        raise ShapeError(f"head_dim is {geometry.head_dim}, expected a multiple of {LANES}")
    check_tensor("query", query, dtype=k_cache.dtype, shape=(None, None, geometry.head_dim))
    group = check_query_heads(query.shape[1], geometry.num_kv_heads)
    if group * geometry.head_dim > max_group_elements:
        raise ShapeError(f"query: {group} heads per KV head of {geometry.head_dim} is too many")
    return geometry, group


def cpu_paged_prefill_attention(
    query: torch.Tensor,  # [n, Hq, D]: the last n tokens of the context
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_table: torch.Tensor,  # int32 [nb]: the sequence's blocks, in position order
    context_len: int,  # cached positions, the n tokens' own K/V among them
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [n, Hq, D], written in place when given
    num_threads: int | None = None,
    options: CompilerOptions = DEFAULT_OPTIONS,
    positions: torch.Tensor | None = None,  # int64 [n]: increasing, the last context_len - 1
) -> torch.Tensor:  # [n, Hq, D]
    """Causal attention of one sequence's last n tokens (or those at `positions`). Raises
    ShapeError on a bad argument, BlockTableError on a context, position or block id outside
    the table or pool, KernelUnavailable when the kernel cannot be built here."""
    check_same_device(block_table=block_table, query=query)
    geometry, group = _check_query_and_cache(query, k_cache, v_cache, MAX_PREFILL_GROUP_ELEMENTS)
    check_tensor("block_table", block_table, dtype=torch.int32, shape=(None,))
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype)
    check_tensor("out", out, dtype=query.dtype, shape=tuple(query.shape))
    if not 1 <= query.shape[0] <= context_len <= block_table.shape[0] * geometry.block_size:
        raise BlockTableError(
            f"context_len {context_len}: outside {query.shape[0]} .. the table's "
            f"{block_table.shape[0] * geometry.block_size} positions"
        )
    if positions is not None:
        check_tensor("positions", positions, dtype=torch.int64, shape=(query.shape[0],))
        check_same_device(positions=positions, query=query)
        positions = positions.contiguous()
    kernel = load_decode_kernel(options)
    if kernel.prefill is None:
        raise KernelUnavailable(kernel.reason)
    status = kernel.prefill(
        out.data_ptr(),
        query.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_table.data_ptr(),
        None if positions is None else positions.data_ptr(),
        query.shape[0],
        context_len,
        geometry.num_kv_heads,
        group,
        geometry.head_dim,
        geometry.num_blocks,
        geometry.block_size,
        block_table.shape[0],
        *out.stride()[:2],
        *query.stride()[:2],
        *k_cache.stride()[:3],
        scale,
        DTYPE_CODES[query.dtype],
        torch.get_num_threads() if num_threads is None else num_threads,
    )
    if status == 1:
        raise ShapeError(STATUS_ERRORS[status])
    if status != 0:
        raise BlockTableError(STATUS_ERRORS[status])
    return out
