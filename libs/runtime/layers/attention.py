"""Attention over the paged KV pool, as interchangeable backends chosen once per model.

Each backend stores the step's new K/V at their slots, then attends. `prepare` turns the batch
into whatever per-step metadata the backend wants, once per forward pass rather than per layer.

- `reference`: the torch oracle (kernels/attention_ref.py); slow, obviously right.
- `cpu`: the fast CPU path; decode rows are attended together by the fused paged-decode C
  kernel and each prefill chunk by the paged-prefill one (kernels/cpu_decode_attention.py), or
  where they cannot be built, decode rows by one batched SDPA call over gathered context and
  prefill chunks one SDPA call each.
- `triton`: the GPU path; Triton kernels for the KV store, paged decode and paged prefill.
"""

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from duetserve.runtime.batch import ForwardBatch
from duetserve.runtime.kernels.attention_ref import paged_attention_ref, store_kv_ref
from duetserve.runtime.kernels.cpu.build import CompilerOptions
from duetserve.runtime.kernels.cpu_decode_attention import (
    DEFAULT_OPTIONS,
    DTYPE_CODES,
    PagedDecodeCall,
    cpu_kernels_available,
    cpu_paged_prefill_attention,
)

_log = logging.getLogger(__name__)


class AttentionBackend(Protocol):
    name: str

    def prepare(self, batch: ForwardBatch, block_size: int) -> object: ...

    def attend(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [N, bs, Hkv, D]
        v_cache: torch.Tensor,  # [N, bs, Hkv, D]
        metadata: object,
        scale: float,
    ) -> torch.Tensor: ...  # [T, Hq, D]


class ReferenceAttention:
    name = "reference"

    def prepare(self, batch: ForwardBatch, block_size: int) -> ForwardBatch:
        return batch

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: object,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(metadata, ForwardBatch)
        b = metadata
        store_kv_ref(k, v, k_cache, v_cache, b.slot_mapping)
        positions = b.positions if b.scattered else None
        return paged_attention_ref(
            q, k_cache, v_cache, b.block_tables, b.query_start_loc, b.seq_lens, scale, positions
        )


@dataclass(frozen=True, slots=True)
class _PrefillChunk:
    rows: slice  # this sequence's query rows: the last n positions of its context
    table: torch.Tensor  # int32 [nb]: its context's blocks, in position order
    context_len: int
    positions: torch.Tensor | None = None  # int64 [n]: a scattered chunk's row positions


@dataclass(slots=True)
class _DecodeGroup:
    """The one-token sequences of a step, attended together."""

    rows: torch.Tensor  # int64 [Bd]: their query rows
    every_row: bool  # rows are all T query rows, in order: q needs no gather
    block_tables: torch.Tensor  # int32 [Bd, nb]: nb blocks cover the longest context
    seq_lens: torch.Tensor  # int32 [Bd]
    # The SDPA path's mask, block list and gather buffers, made on first use and reused by every
    # layer of the step: a fresh multi-megabyte tensor per layer costs more in page faults than
    # the copy itself.
    derived: dict[str, torch.Tensor] = field(default_factory=dict)
    fused_call: PagedDecodeCall | None = None  # the fused kernel's arguments, checked once

    def mask(self, block_size: int) -> torch.Tensor:
        """bool [Bd, 1, 1, nb * bs]: True where a position is inside the context."""
        if "mask" not in self.derived:
            positions = torch.arange(self.block_tables.shape[1] * block_size)
            mask = positions.unsqueeze(0) < self.seq_lens.long().unsqueeze(1)
            self.derived["mask"] = mask[:, None, None, :]
        return self.derived["mask"]

    def gather(self, name: str, cache: torch.Tensor) -> torch.Tensor:
        """[Bd * nb, bs, Hkv, D]: the group's blocks of one layer's cache, rows padded to nb."""
        if "blocks" not in self.derived:
            self.derived["blocks"] = self.block_tables.long().flatten()
        blocks = self.derived["blocks"]
        buffer = self.derived.get(name)
        if buffer is None:
            buffer = self.derived[name] = cache.new_empty(len(blocks), *cache.shape[1:])
        return torch.index_select(cache, 0, blocks, out=buffer)


@dataclass(frozen=True, slots=True)
class _CpuMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    decode: _DecodeGroup | None
    prefill: tuple[_PrefillChunk, ...]


class CpuAttention:
    """Decode rows by the fused paged-decode kernel and prefill chunks by the paged-prefill one,
    both reading K/V where they lie in the pool (prefill: 2.3-5x torch's SDPA over a gathered
    context, 64-1,024 tokens, bfloat16). Where they cannot be built (or for a float16 cache),
    decode rows by gathering each sequence's context a whole block at a time (`index_select`
    copies a block contiguously; advanced indexing is several times slower here) into one
    batched SDPA call, and prefill chunks by gather and SDPA."""

    name = "cpu"

    def __init__(self, kernels: CompilerOptions | None = DEFAULT_OPTIONS) -> None:
        """kernels: how to build the fused kernel (at first use, cached); None: SDPA only."""
        available, reason = (
            cpu_kernels_available(kernels) if kernels is not None else (False, "not asked for")
        )
        self.fused = available
        how = "the fused paged kernels" if available else "SDPA over gathered blocks"
        _log.info("cpu attention: decode rows by %s (kernel %s)", how, reason)

    def prepare(self, batch: ForwardBatch, block_size: int) -> _CpuMetadata:
        prefill: list[_PrefillChunk] = []
        starts = batch.query_start_loc.tolist()
        for b, (n, context) in enumerate(zip(batch.query_lens, batch.context_lens, strict=True)):
            if n > 1:
                table = batch.block_tables[b, : _cdiv(context, block_size)]
                rows = slice(starts[b], starts[b + 1])
                # A scattered chunk's rows are its context's last n only if they are contiguous.
                scattered = batch.scattered and (int(batch.positions[rows.start]) != context - n)
                positions = batch.positions[rows] if scattered else None
                prefill.append(_PrefillChunk(rows, table, context, positions))
        return _CpuMetadata(batch.slot_mapping, _decode_group(batch, block_size), tuple(prefill))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: object,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(metadata, _CpuMetadata)
        m = metadata
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, m.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, m.slot_mapping, v.to(v_cache.dtype))
        decode = m.decode
        fused = self.fused and k_cache.dtype in DTYPE_CODES
        attend_decode = _decode_fused if fused else _decode_sdpa
        if decode is not None and decode.every_row:
            return attend_decode(q, k_cache, v_cache, decode, scale)
        out = torch.empty_like(q)
        if decode is not None:
            decoded = attend_decode(q[decode.rows], k_cache, v_cache, decode, scale)
            out.index_copy_(0, decode.rows, decoded)
        for chunk in m.prefill:
            if fused:  # written in place, into out's rows of the chunk
                cpu_paged_prefill_attention(
                    q[chunk.rows],
                    k_cache,
                    v_cache,
                    chunk.table,
                    chunk.context_len,
                    scale,
                    out=out[chunk.rows],
                    positions=chunk.positions,
                )
            else:
                out[chunk.rows] = _prefill(q[chunk.rows], k_cache, v_cache, chunk, scale)
        return out


def _decode_group(batch: ForwardBatch, block_size: int) -> _DecodeGroup | None:
    decode_ids = [b for b, n in enumerate(batch.query_lens) if n == 1]
    if not decode_ids:
        return None
    every_row = len(decode_ids) == batch.num_seqs  # one row per sequence, so rows == seqs
    ids = torch.tensor(decode_ids)
    seq_lens = batch.seq_lens[ids]  # [Bd]
    num_blocks = _cdiv(max(batch.context_lens[b] for b in decode_ids), block_size)
    block_tables = batch.block_tables[ids, :num_blocks]  # [Bd, nb]
    return _DecodeGroup(batch.query_start_loc.long()[ids], every_row, block_tables, seq_lens)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _chunk_mask(n: int, context: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The last n positions of a context of `context` tokens (or the given positions) see keys
    up to themselves."""
    q_pos = (torch.arange(context - n, context) if positions is None else positions).unsqueeze(1)
    return torch.arange(context).unsqueeze(0) <= q_pos  # [n, S]


def _decode_fused(
    q: torch.Tensor,  # [Bd, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    group: _DecodeGroup,
    scale: float,
) -> torch.Tensor:  # [Bd, Hq, D]
    call = group.fused_call
    if call is None:  # the first layer's: checked once for the step, see PagedDecodeCall
        call = group.fused_call = PagedDecodeCall(
            q, k_cache, v_cache, group.block_tables, group.seq_lens, scale
        )
    return call(q, k_cache, v_cache)


def _decode_sdpa(
    q: torch.Tensor,  # [Bd, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    group: _DecodeGroup,
    scale: float,
) -> torch.Tensor:  # [Bd, Hq, D]
    # One query per sequence, so the q heads sharing a KV head play the role of SDPA's query
    # length: [Bd, Hkv, G, D] against keys [Bd, Hkv, S, D].
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    shape = (num_seqs, -1, num_kv_heads, head_dim)
    keys = group.gather("k", k_cache).view(shape).transpose(1, 2)  # [Bd, Hkv, S, D]
    values = group.gather("v", v_cache).view(shape).transpose(1, 2)
    grouped = q.reshape(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    mask = group.mask(k_cache.shape[1])
    out = F.scaled_dot_product_attention(
        grouped, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale
    )
    return out.reshape(num_seqs, num_q_heads, head_dim)


def _prefill(
    q: torch.Tensor,  # [n, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    chunk: _PrefillChunk,
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    shape = (-1, *k_cache.shape[2:])
    blocks = chunk.table.long()
    keys = k_cache.index_select(0, blocks).view(shape)[: chunk.context_len]  # [S, Hkv, D]
    values = v_cache.index_select(0, blocks).view(shape)[: chunk.context_len]
    n = q.shape[0]
    full = n == chunk.context_len and chunk.positions is None
    mask = None if full else _chunk_mask(n, chunk.context_len, chunk.positions)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, Hq, n, D]
        keys.transpose(0, 1).unsqueeze(0).to(q.dtype),  # [1, Hkv, S, D]
        values.transpose(0, 1).unsqueeze(0).to(q.dtype),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


class TritonAttention:
    """GPU path. The kernels are imported on first use so CPU-only processes never need them."""

    name = "triton"

    def prepare(self, batch: ForwardBatch, block_size: int) -> ForwardBatch:
        return batch

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: object,
        scale: float,
    ) -> torch.Tensor:
        from duetserve.runtime.kernels.decode_attention import paged_decode_attention
        from duetserve.runtime.kernels.kv_store import store_kv
        from duetserve.runtime.kernels.prefill_attention import paged_prefill_attention

        assert isinstance(metadata, ForwardBatch)
        b = metadata
        store_kv(k, v, k_cache, v_cache, b.slot_mapping)
        if b.is_decode_only:  # a one-token chunk sits at its context's end, scattered or not
            return paged_decode_attention(q, k_cache, v_cache, b.block_tables, b.seq_lens, scale)
        return paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            b.block_tables,
            b.query_start_loc,
            b.seq_lens,
            scale,
            b.max_query_len,
            b.positions if b.scattered else None,
        )


BACKENDS: dict[str, type[ReferenceAttention] | type[CpuAttention] | type[TritonAttention]] = {
    "reference": ReferenceAttention,
    "cpu": CpuAttention,
    "triton": TritonAttention,
}


def default_backend(device: torch.device) -> AttentionBackend:
    return TritonAttention() if device.type == "cuda" else CpuAttention()
