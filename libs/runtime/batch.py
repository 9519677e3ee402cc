"""The forward batch: everything a forward pass needs to know, passed explicitly.

A batch is a list of sequence chunks. Each chunk is a run of new tokens of one sequence whose
first `num_cached_tokens` tokens already have their K/V in the pool (computed by an earlier
step, or by an earlier request with the same prefix). Prefill (num_cached_tokens == 0), chunked
prefill, decode (one new token) and any mix of them are all the same shape of batch.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from duetserve.runtime.config import ModelConfig
from duetserve.runtime.errors import BlockTableError, ContextLengthError, InvalidTokenError
from duetserve.runtime.kv_pool import KVPool


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    token_ids: Sequence[int]  # the new tokens of this step
    num_cached_tokens: int  # tokens before them whose K/V are already in the pool
    block_table: Sequence[int]  # pool block ids of this sequence, in position order
    all_logits: bool = False  # logits for every new token, not just the last
    positions: Sequence[int] | None = None  # a scattered chunk's increasing token positions

    @classmethod
    def scattered(
        cls,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_table: Sequence[int],
        all_logits: bool = False,
    ) -> "SequenceChunk":
        """Tokens at the given increasing positions; the positions between them, up to the
        last, hold K/V already in the pool."""
        cached = (positions[-1] + 1 - len(token_ids)) if positions else 0
        return cls(token_ids, cached, block_table, all_logits, positions)

    @property
    def context_len(self) -> int:
        return self.num_cached_tokens + len(self.token_ids)

    def token_positions(self) -> Sequence[int]:
        if self.positions is not None:
            return self.positions
        return range(self.num_cached_tokens, self.context_len)


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]: block_id * block_size + offset
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]: context length after this step
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    logits_indices: torch.Tensor  # int64 [R]: rows of the T tokens that get logits
    query_lens: tuple[int, ...]  # host copy of the per-sequence new-token counts
    context_lens: tuple[int, ...]  # host copy of seq_lens
    # Some chunk is scattered: query rows sit at `positions`, not at each context's end.
    scattered: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        config: ModelConfig,
        pool: KVPool,
        device: str | torch.device | None = None,
    ) -> "ForwardBatch":
        """Validate the chunks against the model and the pool, then lay them out as tensors,
        on `device` (by default the pool's: where the model that writes the pool runs).
        Raises before anything is written, so a refused batch leaves the pool untouched."""
        if device is None:
            device = pool.device
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        for index, chunk in enumerate(chunks):
            _validate_chunk(index, chunk, config, pool)
        block_size = pool.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        starts = [0]
        for chunk in chunks:
            first = len(input_ids)
            input_ids.extend(chunk.token_ids)
            new_positions = chunk.token_positions()
            positions.extend(new_positions)
            table = chunk.block_table
            slots.extend(
                table[p // block_size] * block_size + p % block_size for p in new_positions
            )
            last = len(input_ids)
            logits_indices.extend(range(first, last) if chunk.all_logits else [last - 1])
            starts.append(last)
        width = max((c.context_len + block_size - 1) // block_size for c in chunks)
        # Rows are padded with block 0 past each sequence's own blocks; nothing reads them.
        tables = [_padded(c.block_table, width) for c in chunks]

        def tensor(values: Sequence[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(starts, torch.int32),
            seq_lens=tensor([c.context_len for c in chunks], torch.int32),
            block_tables=tensor(tables, torch.int32),
            logits_indices=tensor(logits_indices, torch.int64),
            query_lens=tuple(len(c.token_ids) for c in chunks),
            context_lens=tuple(c.context_len for c in chunks),
            scattered=any(c.positions is not None for c in chunks),
        )


def _padded(block_table: Sequence[int], width: int) -> list[int]:
    row = list(block_table[:width])
    return row + [0] * (width - len(row))


def _validate_chunk(index: int, chunk: SequenceChunk, config: ModelConfig, pool: KVPool) -> None:
    if not chunk.token_ids:
        raise ValueError(f"sequence {index}: a chunk needs at least one new token")
    if chunk.num_cached_tokens < 0:
        raise ValueError(f"sequence {index}: num_cached_tokens must be >= 0")
    if chunk.positions is not None:
        _validate_positions(index, chunk)
    low, high = min(chunk.token_ids), max(chunk.token_ids)
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise InvalidTokenError(
            f"sequence {index}: token id {bad} outside the vocabulary [0, {config.vocab_size})"
        )
    if chunk.context_len > config.max_context_len:
        raise ContextLengthError(
            f"sequence {index}: {chunk.context_len} tokens exceed the model's context of "
            f"{config.max_context_len}"
        )
    needed = (chunk.context_len + pool.block_size - 1) // pool.block_size
    if len(chunk.block_table) < needed:
        raise BlockTableError(
            f"sequence {index}: {chunk.context_len} tokens need {needed} blocks, "
            f"the block table has {len(chunk.block_table)}"
        )
    used = chunk.block_table[:needed]
    if min(used) < 0 or max(used) >= pool.num_blocks:
        raise BlockTableError(
            f"sequence {index}: block table points outside the pool of {pool.num_blocks} blocks"
        )


def _validate_positions(index: int, chunk: SequenceChunk) -> None:
    positions = chunk.positions
    assert positions is not None
    if len(positions) != len(chunk.token_ids):
        raise ValueError(
            f"sequence {index}: {len(positions)} positions for {len(chunk.token_ids)} tokens"
        )
    if positions[0] < 0 or any(b <= a for a, b in itertools.pairwise(positions)):
        raise ValueError(f"sequence {index}: positions must be increasing and >= 0")
    if positions[-1] + 1 != chunk.context_len:
        raise ValueError(
            f"sequence {index}: positions end at {positions[-1]}, the context is "
            f"{chunk.context_len} tokens (use SequenceChunk.scattered)"
        )
