"""One simulated unit: the planner's state plus workers whose steps take the cost model's time.

- semi-pd: a prefill and a decode worker run at the same time on their compute shares, over
  one KV pool (one `UnitView`); with a `SplitController`, the scheduler's partition
  controller moves the shares as it does live (it sees the same TTFTs, TPOTs, arrivals and
  prefill batch times; a new split applies from each worker's next step);
- unified: one worker; each step decodes every running sequence and spends what is left of
  the prefill budget (the planner's `decode_tokens`) on prompts;
- disagg: each worker a full device with its own pool; a finished prompt's KV is copied to the
  decode pool at a cost per token, and its prefill blocks are freed when the copy lands.

With a host tier (`UnitSetup.host_blocks`), a preempted request's KV is swapped out when the
live scheduler's cost rule says so (`prefer_swap`: copying out and back costs less than
prefilling again, at the measured prefill rate), as FastSwitch does: the copy runs on a copy
engine of its own (it does not slow the steps), the device blocks come free when it lands, and
the request waits in the queue holding host blocks. Admitted again, it is copied back (after
its copy out, if that is still going) and decodes with no prefill. The host tier holds only
swapped KV here (no multi-turn reuse: the simulator's requests are single turns).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

from duetserve.loadtest.sim.cost import CostModel, attended_keys
from duetserve.loadtest.spec import RequestResult
from duetserve.services.scheduler.core import prefer_swap
from duetserve.services.scheduler.planner import Planner, PrefillChunk
from duetserve.services.scheduler.policy.base import Rates
from duetserve.services.scheduler.split_controller import SplitController
from duetserve.services.scheduler.state import Phase, SeqState, UnitView
from duetserve.services.scheduler.step_model import StepModel

Mode = Literal["semi-pd", "unified", "disagg"]
Schedule = Callable[[float, Callable[[float], None]], None]  # (time, action(now))


@dataclass(slots=True)
class Record:
    seq: SeqState
    result: RequestResult
    prompt_tokens: int  # the original prompt (seq.prompt_len grows with recompute)
    # Where its answer ends (its EOS), hidden from the planner, which sees seq.max_tokens and
    # seq.output_bound as a live scheduler does; None: at seq.max_tokens.
    output_tokens: int | None = None
    host_blocks: int = 0  # swapped out: host-tier blocks its KV is in
    out_done_s: float = 0.0  # when its swap-out copy lands

    def kv_tokens(self) -> int:
        """Tokens whose KV a decoding sequence holds: prompt and every output but the last."""
        return self.prompt_tokens + self.seq.num_output - 1


@dataclass(frozen=True, slots=True)
class UnitSetup:
    mode: Mode
    share: tuple[float, float]  # (prefill, decode) compute shares in semi-pd
    num_blocks: int  # per pool
    transfer_s_per_token: float  # disagg only
    host_blocks: int = 0  # the host tier, for preemption by swap (0: recompute only)
    swap_s_per_token: float = 0.0  # copying one token's KV one way, device <-> host


class Unit:
    def __init__(
        self, setup: UnitSetup, planner: Planner, cost: CostModel, schedule: Schedule
    ) -> None:
        self.setup, self.planner, self.cost, self.schedule = setup, planner, cost, schedule
        self.view = UnitView(free_blocks=setup.num_blocks, total_blocks=setup.num_blocks)
        self.decode_view = self.view
        if setup.mode == "disagg":
            self.decode_view = UnitView(setup.num_blocks, setup.num_blocks)
        self.records: dict[str, Record] = {}
        self.share = setup.share  # (prefill, decode), moved by the controller
        self.controller: SplitController | None = None
        self.split_moves = 0
        self.prefill_busy = self.decode_busy = False
        self.handoffs: list[SeqState] = []  # disagg: waiting for room in the decode pool
        self.host_free = setup.host_blocks
        self.swaps_out = self.swaps_in = 0
        self.swapping_in: list[SeqState] = []  # admitted, their KV on its way back
        self.plan_seconds: list[float] = []
        # What the unit measures of itself for the policies, as the live scheduler does: its
        # steps' time against their batch, and prefill seconds per token.
        self.steps = StepModel()
        self._step_s: float | None = None
        self._prefill_s_per_token: float | None = None

    @property
    def load(self) -> int:
        return len(self.records)

    @property
    def host_held(self) -> int:
        return self.setup.host_blocks - self.host_free

    def add(self, record: Record, now: float) -> None:
        self.records[record.seq.request_id] = record
        if self.controller is not None:
            self.controller.observe_arrival(record.prompt_tokens)
        self.view.waiting.append(record.seq)
        self.kick(now)

    def kick(self, now: float) -> None:
        """Start whatever worker is idle and has work."""
        if self.setup.mode == "unified":
            if not self.prefill_busy:
                self._start_unified(now)
            return
        if not self.decode_busy:  # first: its preemptions free blocks and requeue prompts
            self._start_decode(now)
        if self.setup.mode == "disagg":
            self._start_transfers(now)
        if not self.prefill_busy:
            self._start_prefill(now)

    def control(self, now: float) -> None:
        """One tick of the partition controller: a decision when a window closed."""
        if self.controller is None:
            return
        decision = self.controller.maybe_decide(now)
        if decision is not None and decision.split != self.share[0]:
            self.share = (decision.split, round(1.0 - decision.split, 6))
            self.split_moves += 1

    # --- planning and blocks ---

    def _observe_step(self, batch: int, seconds: float) -> None:
        self._step_s = seconds
        self.steps.observe(batch, seconds)

    def _observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            rate, known = seconds / tokens, self._prefill_s_per_token
            self._prefill_s_per_token = rate if known is None else 0.9 * known + 0.1 * rate

    def _rates(self) -> Rates | None:
        if self._step_s is None or self._prefill_s_per_token is None:
            return None
        return Rates(self._step_s, self._prefill_s_per_token, self.steps.line())

    def _plan(self, now: float, decode_tokens: int) -> tuple[PrefillChunk, ...]:
        self.planner.rates = self._rates()
        start = time.perf_counter()
        plan = self.planner.plan(self.view, now, decode_tokens)
        self.plan_seconds.append(time.perf_counter() - start)
        for victim in self.planner.policy.preemptions():  # as the live scheduler does
            record = self.records.get(victim)
            if record is not None and record.seq.phase == Phase.DECODING:
                self._preempt(record.seq, now)
        for rejection in plan.reject:
            seq = self.records[rejection.request_id].seq
            self.view.waiting.remove(seq)
            self._close(seq, now, rejection.reason)
        for admission in plan.admit:
            seq = self.records[admission.request_id].seq
            self.view.waiting.remove(seq)
            self.view.free_blocks -= admission.num_new_blocks
            seq.num_blocks += admission.num_new_blocks
            if seq.swapped:
                self._swap_in(seq, now)
                continue
            seq.phase = Phase.PREFILLING
            self.view.prefilling.append(seq)
        return plan.prefill

    def _grow(self, seq: SeqState, now: float) -> bool:
        """Blocks for one more token of a decoding sequence, preempting when out of blocks;
        False when the sequence itself was preempted or failed."""
        pool = self.decode_view
        needed = self.planner.blocks_for(self.records[seq.request_id].kv_tokens() + 1)
        needed -= seq.num_blocks
        if needed > pool.free_blocks:
            preemption = self.planner.preempt(pool, seq, needed, now)
            for failure in preemption.fail:
                self._close(self.records[failure.request_id].seq, now, failure.reason)
            for victim in preemption.victims:
                self._preempt(self.records[victim].seq, now)
            if seq.phase != Phase.DECODING or needed > pool.free_blocks:
                return False
        if needed > 0:
            pool.free_blocks -= needed
            seq.num_blocks += needed
        return True

    def _preempt(self, seq: SeqState, now: float) -> None:
        """Back to waiting: its KV swapped out to the host tier when the cost rule says so
        and the tier has room, else to recompute prompt and outputs so far."""
        record = self.records[seq.request_id]
        self.decode_view.decoding.remove(seq)
        blocks, tokens = seq.num_blocks, record.kv_tokens()
        swap = (
            self.setup.host_blocks > 0
            and blocks <= self.host_free
            and prefer_swap(tokens, self.setup.swap_s_per_token, self._prefill_s_per_token)
        )
        seq.prompt_len = record.prompt_tokens + seq.num_output
        seq.num_cached = seq.num_computed = seq.num_blocks = 0
        if swap:
            self.host_free -= blocks
            record.host_blocks = blocks
            record.out_done_s = now + tokens * self.setup.swap_s_per_token
            seq.swapped, seq.num_computed = True, seq.prompt_len
            self.swaps_out += 1
            self.schedule(record.out_done_s, partial(self._swapped_out, blocks))
        else:
            self.decode_view.free_blocks += blocks
        seq.phase = Phase.WAITING
        seq.num_preemptions += 1
        self.view.waiting.append(seq)

    def _swapped_out(self, blocks: int, now: float) -> None:
        """A swap-out's copy landed: its device blocks are free."""
        self.decode_view.free_blocks += blocks
        self.kick(now)

    def _swap_in(self, seq: SeqState, now: float) -> None:
        """Admitted again with its KV in the host tier: copied back (once its copy out is
        done), then it decodes."""
        record = self.records[seq.request_id]
        start = max(now, record.out_done_s)
        self.swapping_in.append(seq)
        self.schedule(
            start + record.kv_tokens() * self.setup.swap_s_per_token,
            partial(self._swapped_in, seq),
        )

    def _swapped_in(self, seq: SeqState, now: float) -> None:
        record = self.records.get(seq.request_id)
        self.swapping_in.remove(seq)
        if record is None:
            return
        self.host_free += record.host_blocks
        record.host_blocks = 0
        seq.swapped = False
        seq.phase = Phase.DECODING
        self.decode_view.decoding.append(seq)
        self.swaps_in += 1
        self.kick(now)

    def _close(self, seq: SeqState, now: float, error: str | None = None) -> None:
        """Finished (or failed): give back its blocks and leave the unit."""
        record = self.records.pop(seq.request_id)
        pool = self.decode_view if seq.phase == Phase.DECODING else self.view
        if seq in pool.decoding:
            pool.decoding.remove(seq)
        if seq in self.view.prefilling:
            self.view.prefilling.remove(seq)
        pool.free_blocks += seq.num_blocks
        seq.num_blocks = 0
        self.host_free += record.host_blocks
        record.host_blocks = 0
        record.result.error = error
        record.result.done_s = None if error else now
        record.result.output_tokens = seq.num_output
        first = record.result.first_token_s
        if self.controller is not None and not error and first is not None:
            tpot = (now - first) / (seq.num_output - 1) if seq.num_output > 1 else None
            if tpot is not None:
                self.controller.observe_tpot(tpot)
            self.controller.observe_finished(first - record.result.sent_s, tpot)

    def _emit(self, seq: SeqState, now: float) -> bool:
        """One output token at `now`; True when the request is done (and closed)."""
        seq.num_output += 1
        result = self.records[seq.request_id].result
        result.token_times_s.append(now)
        if result.first_token_s is None:
            result.first_token_s = now
            if self.controller is not None:
                self.controller.observe_ttft(now - result.sent_s)
        end = self.records[seq.request_id].output_tokens or seq.max_tokens
        if seq.num_output >= min(end, seq.max_tokens):
            self._close(seq, now)
            return True
        return False

    # --- prefill ---

    @staticmethod
    def _prefill_work(chunks: tuple[PrefillChunk, ...]) -> tuple[int, int]:
        tokens = sum(c.num_tokens for c in chunks)
        return tokens, sum(attended_keys(c.start, c.num_tokens) for c in chunks)

    def _start_prefill(self, now: float) -> None:
        chunks = self._plan(now, 0)
        if not chunks:
            return
        share = 1.0 if self.setup.mode == "disagg" else self.share[0]
        seconds = self.cost.prefill_s(*self._prefill_work(chunks), share)
        self._observe_prefill(self._prefill_work(chunks)[0], seconds)
        if self.controller is not None:
            self.controller.observe_prefill_batch(self._prefill_work(chunks)[0], seconds, share)
        if self.setup.mode == "semi-pd" and self.decode_busy:
            seconds *= self.cost.contention("prefill")
        self.prefill_busy = True
        self.schedule(now + seconds, lambda t: self._prefill_done(chunks, t))

    def _prefill_done(self, chunks: tuple[PrefillChunk, ...], now: float) -> None:
        self.prefill_busy = False
        self._apply_chunks(chunks, now)
        self.kick(now)

    def _apply_chunks(self, chunks: tuple[PrefillChunk, ...], now: float) -> None:
        for chunk in chunks:
            seq = self.records[chunk.request_id].seq
            seq.num_computed += chunk.num_tokens
            if not chunk.is_last or self._emit(seq, now):
                continue
            self.view.prefilling.remove(seq)
            if self.setup.mode == "disagg":
                self.handoffs.append(seq)
            else:
                seq.phase = Phase.DECODING
                self.view.decoding.append(seq)

    # --- decode ---

    def _decode_batch(self, now: float) -> list[SeqState]:
        batch = []
        for seq in list(self.decode_view.decoding):
            # an earlier sequence's preemption may have sent this one back to waiting
            if seq.phase == Phase.DECODING and self._grow(seq, now):
                batch.append(seq)
        return [seq for seq in batch if seq.phase == Phase.DECODING]

    def _decode_work(self, batch: list[SeqState]) -> int:
        return sum(self.records[seq.request_id].kv_tokens() + 1 for seq in batch)

    def _start_decode(self, now: float) -> None:
        batch = self._decode_batch(now)
        if not batch:
            return
        share = 1.0 if self.setup.mode == "disagg" else self.share[1]
        seconds = self.cost.decode_s(len(batch), self._decode_work(batch), share)
        busy = self.prefill_busy or self.view.waiting or self.view.prefilling
        if self.setup.mode == "semi-pd" and busy:
            seconds *= self.cost.contention("decode")  # prompts waiting: prefill starts next
        self._observe_step(len(batch), seconds)
        self.decode_busy = True
        self.schedule(now + seconds, lambda t: self._decode_done(batch, t))

    def _decode_done(self, batch: list[SeqState], now: float) -> None:
        self.decode_busy = False
        for seq in batch:
            if seq.phase == Phase.DECODING:
                self._emit(seq, now)
        self.kick(now)

    # --- unified: one worker, mixed steps ---

    def _start_unified(self, now: float) -> None:
        batch = self._decode_batch(now)
        chunks = self._plan(now, len(batch))
        if not batch and not chunks:
            return
        tokens, keys = self._prefill_work(chunks)
        seconds = self.cost.mixed_s(tokens, keys, len(batch), self._decode_work(batch), 1.0)
        if batch:
            self._observe_step(len(batch), seconds)
        if tokens:  # the step's prefill share, as the live scheduler's batch timing sees it
            prefill_alone = self.cost.mixed_s(tokens, keys, 0, 0, 1.0)
            self._observe_prefill(tokens, prefill_alone)
        self.prefill_busy = True
        self.schedule(now + seconds, lambda t: self._unified_done(batch, chunks, t))

    def _unified_done(
        self, batch: list[SeqState], chunks: tuple[PrefillChunk, ...], now: float
    ) -> None:
        self.prefill_busy = False
        for seq in batch:
            if seq.phase == Phase.DECODING:
                self._emit(seq, now)
        self._apply_chunks(chunks, now)
        self.kick(now)

    # --- disagg: KV copy from the prefill pool to the decode pool ---

    def _start_transfers(self, now: float) -> None:
        while self.handoffs and self.handoffs[0].num_blocks <= self.decode_view.free_blocks:
            seq = self.handoffs.pop(0)
            self.decode_view.free_blocks -= seq.num_blocks
            tokens = self.records[seq.request_id].kv_tokens()
            arrive = now + tokens * self.setup.transfer_s_per_token
            self.schedule(arrive, partial(self._transfer_done, seq))

    def _transfer_done(self, seq: SeqState, now: float) -> None:
        self.view.free_blocks += seq.num_blocks  # the prefill pool's copy is released
        seq.phase = Phase.DECODING
        self.decode_view.decoding.append(seq)
        self.kick(now)
