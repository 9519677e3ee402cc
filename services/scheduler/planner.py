"""The scheduler's planning core: pure, no I/O, so the live service and the simulator share it.

Each call looks at one unit and says which waiting requests get their prompt blocks now, which
prompt tokens the next prefill batch computes, and whom to preempt when decode runs out of
memory. Only prompt blocks are reserved at admission (the decode worker takes growth blocks as
it goes), so concurrency is not capped by reserving max_tokens up front; when memory does run
out, requests are preempted by recompute in the policy's order.
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple

from duetserve.services.scheduler.policy.base import Policy, Rates
from duetserve.services.scheduler.state import SeqState, UnitView


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    block_size: int = 16
    max_prefill_tokens: int = 2048  # token budget of one prefill batch
    max_prefill_seqs: int = 64  # sequences in one prefill batch
    max_running: int = 256  # requests holding blocks (prefilling + decoding)
    decode_reserve_blocks: int = 0  # kept free for decode growth when admitting
    # Which admitted prompts a prefill batch computes first: "arrival" (in the order they were
    # admitted), or "shortest" (fewest prompt tokens left first: a short prompt is not held
    # behind a long one's chunks, and a long one takes what the budget leaves). Under
    # "shortest", a prompt that arrived over prefill_max_wait_s ago goes before all the
    # others (oldest first), so a stream of short prompts cannot starve a long one.
    prefill_order: Literal["arrival", "shortest"] = "shortest"
    prefill_max_wait_s: float = 2.0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_prefill_tokens < 1 or self.max_prefill_seqs < 1:
            raise ValueError("block_size, max_prefill_tokens and max_prefill_seqs must be >= 1")
        if self.prefill_order not in ("arrival", "shortest"):
            raise ValueError(f"prefill_order: arrival or shortest, not {self.prefill_order!r}")


class Admission(NamedTuple):
    request_id: str
    num_new_blocks: int  # blocks to allocate beyond the cached ones


class Rejection(NamedTuple):
    request_id: str
    reason: str


class PrefillChunk(NamedTuple):
    request_id: str
    start: int  # first prompt position computed by this chunk
    num_tokens: int
    is_last: bool  # completes the prompt: the worker samples the first token


class Plan(NamedTuple):
    admit: tuple[Admission, ...]
    reject: tuple[Rejection, ...]
    prefill: tuple[PrefillChunk, ...]


class Preemption(NamedTuple):
    victims: tuple[str, ...]  # give up their blocks and go back to waiting (recompute)
    fail: tuple[Rejection, ...]  # cannot run on this unit at all


class Planner:
    def __init__(self, config: PlannerConfig, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        # Requests that may run at once now, when something measures it (admission.py);
        # never above config.max_running.
        self.running_limit: int | None = None
        self.rates: Rates | None = None  # the unit's step and prefill times, once measured

    @property
    def ceiling(self) -> int:
        """Requests that may run at once by the configuration and the measured limit."""
        limit = self.running_limit
        return self.config.max_running if limit is None else min(limit, self.config.max_running)

    @property
    def max_running(self) -> int:
        """The ceiling, or fewer where the policy caps it (JITServe's group size)."""
        cap = self.policy.running_cap()
        return self.ceiling if cap is None else max(1, min(cap, self.ceiling))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def plan(self, unit: UnitView, now: float, decode_tokens: int = 0) -> Plan:
        """The next step. `decode_tokens` are tokens of the same forward pass spent on decodes
        (a unified worker); they come out of the prefill budget first."""
        self.policy.rank(unit, now, self.ceiling, self.rates)
        admit, reject, admitted = self._admit(unit, now)
        budget = self.config.max_prefill_tokens - decode_tokens
        prefill = self._prefill([*unit.prefilling, *admitted], budget, now)
        return Plan(tuple(admit), tuple(reject), tuple(prefill))

    def prefill_chunks(
        self, unit: UnitView, now: float, decode_tokens: int = 0
    ) -> tuple[PrefillChunk, ...]:
        """The next batch over the admitted prompts, from what each has computed *now*. The
        live scheduler asks again after admitting: admission can find a cached prefix, which
        moves a prompt's start past what `plan` assumed."""
        budget = self.config.max_prefill_tokens - decode_tokens
        return tuple(self._prefill(unit.prefilling, budget, now))

    def _admit(
        self, unit: UnitView, now: float
    ) -> tuple[list[Admission], list[Rejection], list[SeqState]]:
        admit: list[Admission] = []
        reject: list[Rejection] = []
        admitted: list[SeqState] = []
        free = unit.free_blocks - self.config.decode_reserve_blocks
        running = len(unit.prefilling) + len(unit.decoding)
        limit, skip = self.max_running, self.policy.skip_when_blocked()
        if running >= limit or free <= 0 or not unit.waiting:
            # Nobody more runs now (every prompt needs a block; a prompt too long for the
            # pool is refused at submit): the order is not needed.
            return admit, reject, admitted
        for seq in self.policy.admission_order(unit.waiting, now):
            if running >= limit:
                break  # nobody more runs now (a prompt too long for the pool: refused at submit)
            if self.blocks_for(seq.prompt_len) > unit.total_blocks:
                reject.append(Rejection(seq.request_id, self._too_long(seq, unit)))
                continue
            needed = self._new_blocks(seq)
            # A swapped request decodes at once: it comes back only with a block to spare for
            # each decoding request, or its first steps would preempt another (a thrash).
            spare = len(unit.decoding) if seq.swapped else 0
            if needed + spare > free:
                if skip:
                    continue
                break
            admit.append(Admission(seq.request_id, needed))
            admitted.append(seq)
            free -= needed
            running += 1
        return admit, reject, admitted

    def shortfall(self, unit: UnitView, now: float) -> int:
        """Blocks the next request in admission order lacks to be admitted now (0: none
        waits, or it fits, or it is held back by the running limit instead)."""
        if len(unit.prefilling) + len(unit.decoding) >= self.max_running:
            return 0
        free = unit.free_blocks - self.config.decode_reserve_blocks
        for seq in self.policy.admission_order(unit.waiting, now):
            if self.blocks_for(seq.prompt_len) > unit.total_blocks:
                continue  # rejected, not waiting for room
            return max(self._new_blocks(seq) - free, 0)
        return 0

    def _new_blocks(self, seq: SeqState) -> int:
        cached_blocks = seq.num_cached // self.config.block_size
        return max(self.blocks_for(seq.prompt_len) - cached_blocks, 0)

    def _too_long(self, seq: SeqState, unit: UnitView) -> str:
        return (
            f"prompt of {seq.prompt_len} tokens needs {self.blocks_for(seq.prompt_len)} KV "
            f"blocks; the unit has {unit.total_blocks}"
        )

    def _prefill(self, candidates: list[SeqState], budget: int, now: float) -> list[PrefillChunk]:
        chunks: list[PrefillChunk] = []
        if self.config.prefill_order == "shortest":
            overdue = now - self.config.prefill_max_wait_s
            candidates = sorted(candidates, key=lambda s: _shortest_first(s, overdue))
        for seq in candidates:
            if budget <= 0 or len(chunks) >= self.config.max_prefill_seqs:
                break
            remaining = seq.num_uncomputed
            if remaining <= 0 or seq.in_flight:
                continue
            if seq.whole:
                cost = remaining if seq.charge is None else min(seq.charge, remaining)
                if cost > budget and chunks:
                    continue  # whole or not at all: it goes first in a later batch
                chunks.append(PrefillChunk(seq.request_id, seq.num_computed, remaining, True))
                budget -= cost
                continue
            take = min(remaining, budget)
            chunks.append(PrefillChunk(seq.request_id, seq.num_computed, take, take == remaining))
            budget -= take
        return chunks

    def preempt(
        self, unit: UnitView, requester: SeqState, blocks_needed: int, now: float
    ) -> Preemption:
        """`requester` (decoding) needs `blocks_needed` more blocks than are free. Victims go in
        the policy's order until enough is free; when the requester's own turn comes it is the
        victim itself (it is recomputed later, when there is room) and nothing more is needed.
        Only a sequence that would not fit even in an empty pool fails."""
        length = requester.prompt_len + requester.num_output
        if self.blocks_for(length + 1) > unit.total_blocks:
            reason = (
                f"sequence of {length} tokens outgrew the KV pool of {unit.total_blocks} blocks"
            )
            return Preemption((), (Rejection(requester.request_id, reason),))
        # Blocks of requests already told to stop come back soon: count them, pick no one
        # twice (the requester asks again while it waits).
        stopping = [seq for seq in unit.decoding if seq.preempting]
        free = unit.free_blocks + sum(seq.num_blocks for seq in stopping)
        victims: list[str] = []
        running = [seq for seq in unit.decoding if not seq.preempting]
        for seq in self.policy.preemption_order(running, now):
            if free >= blocks_needed:
                break
            victims.append(seq.request_id)
            if seq is requester:
                break
            free += seq.num_blocks
        return Preemption(tuple(victims), ())


def _shortest_first(seq: SeqState, overdue: float) -> tuple[int, float, float]:
    """Sort key of "shortest": the overdue (arrived by `overdue`) oldest first, then the rest
    by prompt tokens left."""
    if seq.arrival <= overdue:
        return (0, seq.arrival, 0.0)
    return (1, float(seq.num_uncomputed), seq.arrival)
