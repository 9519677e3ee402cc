"""Offline generation: run many prompts to completion inside one process.

For tests, benchmarks and batch jobs. Serving does not use it: there kv_manager allocates the
blocks and the scheduler plans the steps. Here a free list stands in for the allocator and the
plan is the simplest continuous batching: every step carries all running decodes plus prefill
chunks of waiting prompts up to a token budget.
"""

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.models.llama import LlamaForCausalLM
from duetserve.runtime.sampling import (
    FinishReason,
    SampledToken,
    Sampler,
    SamplingParams,
    SequenceSamplingState,
    finish_reason,
)


class OutOfBlocksError(RuntimeError):
    """The pool cannot hold the running sequences; give the engine a bigger pool."""


class FreeBlockList:
    def __init__(self, num_blocks: int) -> None:
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"need {count} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)


@dataclass(slots=True)
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    sampled: list[SampledToken] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass(slots=True)
class _Running:
    generation: Generation
    params: SamplingParams
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the pool

    @property
    def all_token_ids(self) -> list[int]:
        return self.generation.prompt_token_ids + self.generation.token_ids


class OfflineEngine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        eos_token_ids: frozenset[int],
        max_batch_tokens: int = 2048,
        max_num_seqs: int = 256,
        seed: int = 0,
    ) -> None:
        self.model, self.pool = model, pool
        self.eos_token_ids = eos_token_ids
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.sampler = Sampler(model.config.vocab_size, eos_token_ids, seed=seed)
        self.blocks = FreeBlockList(pool.num_blocks)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Generation]:
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        waiting = deque(
            _Running(Generation(list(p)), sp) for p, sp in zip(prompts, per_prompt, strict=True)
        )
        results = [r.generation for r in waiting]
        running: list[_Running] = []
        while waiting or running:
            running.extend(self._admit(waiting, running))
            self._step(running)
            for seq in [s for s in running if s.generation.finish_reason is not None]:
                self.blocks.release(seq.block_table)
                running.remove(seq)
        return results

    def _admit(self, waiting: deque[_Running], running: list[_Running]) -> list[_Running]:
        admitted: list[_Running] = []
        while waiting and len(running) + len(admitted) < self.max_num_seqs:
            # Offline runs reserve a sequence's whole length up front, so nothing can run out of
            # blocks halfway (serving reserves prompts only and preempts instead).
            seq = waiting[0]
            needed = self._blocks_for(len(seq.all_token_ids) + seq.params.max_tokens)
            if needed > self.blocks.num_free:
                if not running and not admitted:
                    raise OutOfBlocksError(f"a prompt needs {needed} blocks, pool too small")
                break
            waiting.popleft()
            seq.block_table = self.blocks.allocate(needed)
            admitted.append(seq)
        return admitted

    def _step(self, running: list[_Running]) -> None:
        """One forward pass: every decode, then prefill chunks while the token budget lasts."""
        chunks: list[SequenceChunk] = []
        to_sample: list[tuple[int, _Running]] = []  # (chunk index, sequence) that get a token
        budget = self.max_batch_tokens
        for seq in sorted(running, key=lambda s: len(s.all_token_ids) - s.num_computed):
            tokens = seq.all_token_ids
            take = min(len(tokens) - seq.num_computed, budget)
            if take <= 0:
                break
            self._grow(seq, seq.num_computed + take)
            new = tokens[seq.num_computed : seq.num_computed + take]
            chunks.append(SequenceChunk(new, seq.num_computed, seq.block_table))
            seq.num_computed += take
            budget -= take
            if seq.num_computed == len(tokens):
                to_sample.append((len(chunks) - 1, seq))
        batch = ForwardBatch.build(chunks, self.model.config, self.pool, self.model.device)
        logits = self.model.forward(batch, self.pool)  # [len(chunks), V]
        if to_sample:
            rows = torch.tensor([index for index, _ in to_sample], device=logits.device)
            self._sample(logits[rows], [seq for _, seq in to_sample])

    def _sample(self, logits: torch.Tensor, rows: list[_Running]) -> None:
        states = [
            SequenceSamplingState(r.params, r.generation.prompt_token_ids, r.generation.token_ids)
            for r in rows
        ]
        for seq, token in zip(rows, self.sampler.sample(logits, states), strict=True):
            gen = seq.generation
            gen.token_ids.append(token.token_id)
            gen.sampled.append(token)
            gen.finish_reason = finish_reason(seq.params, self.eos_token_ids, gen.token_ids)

    def _grow(self, seq: _Running, num_tokens: int) -> None:
        missing = self._blocks_for(num_tokens) - len(seq.block_table)
        if missing > 0:
            seq.block_table.extend(self.blocks.allocate(missing))

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.pool.block_size - 1) // self.pool.block_size
