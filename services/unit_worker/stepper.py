"""The decode step loop and the block bookkeeping around it. In unified mode the loop also
takes prefill batches: each joins the next step, one forward pass for both. In disagg mode the
worker's blocks come from its own pool, and admission copies each request's KV into it."""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nats.errors
import torch

from duetserve.common.nats_bus import Bus, BusError, BusTimeout
from duetserve.common.token_outbox import TokenOutbox
from duetserve.common.tracing import traced_as
from duetserve.common.unit_client import Lease, release_blocks
from duetserve.proto import kv, subjects, workers
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.tokens import FinishReason, TokenChunk
from duetserve.runtime.errors import RuntimeInputError
from duetserve.runtime.kv_pool import KVPool
from duetserve.services.unit_worker.compute import WorkerCompute
from duetserve.services.unit_worker.kv_transfer import Copied, TransferError, copy_blocks
from duetserve.services.unit_worker.model_host import ModelHost
from duetserve.services.unit_worker.prefill_step import PrefillOutput, mixed_step, streams_of
from duetserve.services.unit_worker.residents import (
    RecheckParams,
    Resident,
    StepOutcome,
    decode_step,
    positions_of,
    recheck_due,
    recheck_residents,
)
from duetserve.services.unit_worker.sequences import runtime_state, sampling_params
from duetserve.services.unit_worker.settings import UnitWorkerSettings
from duetserve.services.unit_worker.step_log import StepLog

logger = logging.getLogger(__name__)

# The step time a roll call reports (WorkerEvents.step_s, which the scheduler's running limit
# holds against the TPOT targets) is the mean interval over the last STEP_TIME_STEPS steps in
# a row: about one answer's decode, the span a TPOT is averaged over. Over a fixed 2 s window,
# the prefill-heavy start of every burst read as a step time over the target (a burst of 32
# ShareGPT-sized prompts: 5-7 steps in its first second, two of them 0.4-1.0 s mixed steps),
# and back-to-back bursts cut the limit below the burst's size every other burst.
STEP_TIME_STEPS = 64
MIN_STEP_TIME_STEPS = 16  # fewer steps in a row than this say nothing yet


def mean_step_s(ends: Sequence[float]) -> float | None:
    """Seconds per step over the last STEP_TIME_STEPS of `ends` (the end times of steps run
    in a row, oldest first); None when there are fewer than MIN_STEP_TIME_STEPS."""
    if len(ends) < MIN_STEP_TIME_STEPS:
        return None
    first = ends[max(0, len(ends) - STEP_TIME_STEPS)]
    return (ends[-1] - first) / (min(len(ends), STEP_TIME_STEPS) - 1)


@dataclass(frozen=True, slots=True)
class _PendingPrefill:
    batch: workers.PrefillBatch
    output: "asyncio.Future[PrefillOutput]"


class DecodeStepper:
    def __init__(
        self,
        bus: Bus,
        host: ModelHost,
        settings: UnitWorkerSettings,
        holder: str,
        compute: WorkerCompute,
        outbox: TokenOutbox,
        pool: str = kv.UNIT_POOL,
        source: KVPool | None = None,
        lease: Lease | None = None,
    ) -> None:
        """`outbox`: where each step's tokens go, one batch per stream; `pool`: the unit's
        pool this worker's blocks come from (`host`'s); `source` (disagg mode): the unit pool,
        which admitted requests' KV is copied out of; `lease`: the holder's lease, which each
        step waits to have enough of (None: not checked)."""
        self.bus, self.host, self.settings, self.holder = bus, host, settings, holder
        self.outbox = outbox
        self.lease = lease
        self.compute = compute
        self.unit = settings.unit
        self.pool, self.source = pool, source
        self.residents: dict[str, Resident] = {}
        self.accepting = True
        self._controls: list[workers.DecodeControl] = []
        self._work = asyncio.Event()
        self._free_blocks: int | None = None
        self._last_needs_blocks: dict[str, float] = {}
        self._prefills: list[_PendingPrefill] = []
        self._frozen = False  # a hand-over: no step starts any more
        self._idle = asyncio.Event()  # set once the loop has seen _frozen
        # perf_counter at the end of each step, steps in a row (an idle gap clears it)
        self._step_ends: deque[float] = deque(maxlen=STEP_TIME_STEPS)
        self._step_batches: deque[int] = deque(maxlen=STEP_TIME_STEPS)  # requests in each
        self.step_log = StepLog(settings.step_log_dir, "decode")
        self.recheck = RecheckParams(
            settings.span_recheck_interval,
            settings.span_recheck_top,
            settings.span_recheck_threshold,
            settings.span_recheck_layer,
        )
        self.recheck_recomputed = 0  # reused tokens the decode stage recomputed, since start
        # The unit's host tier, mapped (None: none, or disagg mode): preemption may swap KV
        # out to it, and an admission bring it back (`_swap_out`, `_swap_in`).
        self.host_tier: KVPool | None = None
        self._swaps: set[asyncio.Task[None]] = set()
        self._loads = 0  # KV loads so far (each under an owner of its own)
        # On a GPU: the copies' own stream, so that they overlap the model's kernels.
        self._copy_stream: torch.cuda.Stream | None = None
        # Swap copies run on this one thread beside the model's, single-threaded: a copy on a
        # thread of the default pool ran as an OpenMP team of its own, whose threads then spun
        # on the two cores the model's team steps on (decode steps ~50% slower at every batch
        # size while swaps happened).
        self._copier = ThreadPoolExecutor(
            1, "kv-swap", initializer=torch.set_num_threads, initargs=(1,)
        )

    async def prefill(self, batch: workers.PrefillBatch) -> PrefillOutput:
        """Unified mode: compute this batch in the next step, beside the decoding requests."""
        pending = _PendingPrefill(batch, asyncio.get_running_loop().create_future())
        self._prefills.append(pending)
        self._work.set()
        return await pending.output

    # --- between steps --------------------------------------------------------------------

    async def admit(self, items: Sequence[workers.DecodeItem]) -> workers.DecodeAdmitted:
        admitted: list[str] = []
        refused: list[workers.Refusal] = []
        copies: list[Copied] = []
        for item in items:
            outcome = await self._admit_one(item)
            if isinstance(outcome, workers.Refusal):
                refused.append(outcome)
                continue
            admitted.append(item.request_id)
            if outcome is not None:
                copies.append(outcome)
        self._work.set()
        return workers.DecodeAdmitted(
            tuple(admitted),
            tuple(refused),
            kv_copied_blocks=sum(c.blocks for c in copies),
            kv_copied_bytes=sum(c.nbytes for c in copies),
            kv_copy_s=sum(c.seconds for c in copies),
        )

    async def _admit_one(self, item: workers.DecodeItem) -> workers.Refusal | Copied | None:
        """Take a request over: its blocks (retained in place, or copied into this worker's
        own pool in disagg mode), its sampling state. A refusal says why."""
        request_id = item.request_id
        if request_id in self.residents:  # offered again (the first offer's answer was late)
            return None
        if not self.accepting:
            return workers.Refusal(request_id, "the decode worker is draining")
        if len(self.residents) >= self.settings.max_resident:
            return workers.Refusal(request_id, "the decode worker is full", retry=True)
        try:
            params = sampling_params(item.state.sampling, self.host.config.vocab_size)
        except RuntimeInputError as err:
            return workers.Refusal(request_id, str(err))
        owner = f"{self.holder}/{request_id}"
        copied: Copied | None = None
        with traced_as(item.traceparent, "decode.admit"):
            if self.source is None or item.from_worker:
                block_table = list(item.block_table)
                held_by = (item.owner,) if item.owner else ()
                retain = kv.RetainBlocks(owner, item.block_table, held_by)
                refusal = await self._retain(request_id, retain)
                if refusal is not None:
                    return refusal
                if item.host_block_ids and (why := await self._swap_in(item, block_table)):
                    await release_blocks(self.bus, self.unit, owner, self.pool)
                    return workers.Refusal(request_id, why, swap_failed=True)
            else:
                taken = await self._copy_in(owner, item)
                if isinstance(taken, workers.Refusal):
                    return taken
                block_table, copied = taken
        state = runtime_state(item.state, params)
        self.residents[request_id] = Resident(
            request_id,
            owner,
            block_table,
            state,
            item.state.sampling,
            item.state.stream,
            traceparent=item.traceparent,
            host_kept=item.host_kept,
            reused=positions_of(item.reused),
        )
        self._remember_output(request_id, item.state)
        return copied

    def _remember_output(self, request_id: str, state: workers.SamplingState) -> None:
        """Keep the output the request comes with for replay: if a chunk of it was lost on its
        way (from a prefill worker, or the worker this one replaces), this worker can send it
        again. Not where logprobs were asked for: the state does not carry them."""
        output = state.output_token_ids
        if not output or state.sampling.logprobs is not None:
            return
        cached = state.cached_tokens or None
        chunk = TokenChunk(request_id, 0, output, cached_tokens=cached)
        self.outbox.remember(state.stream, chunk)

    async def _retain(self, request_id: str, retain: kv.RetainBlocks) -> workers.Refusal | None:
        """Take the references an admission needs; None once taken. A retain that got no
        answer may have been done all the same: whatever its owner holds goes back before the
        refusal (the offer made again retains afresh), and the scheduler, which still holds
        the blocks, is told to offer it again."""
        try:
            reply = await self.bus.request(
                subjects.kv(self.unit, "retain", self.pool), encode(retain)
            )
            answer = decode(reply.data, kv.BlocksGranted, ErrorReply)
        except BusTimeout as err:
            await release_blocks(self.bus, self.unit, retain.owner, self.pool)
            why = f"could not take over its blocks: {err}"
            return workers.Refusal(request_id, why, retry=True)
        except ProtoError as err:
            return workers.Refusal(request_id, f"could not take over its blocks: {err}")
        if isinstance(answer, ErrorReply):
            why = f"could not take over its blocks: {answer.message}"
            return workers.Refusal(request_id, why)
        self._free_blocks = answer.num_free
        return None

    async def _copy_in(
        self, owner: str, item: workers.DecodeItem
    ) -> workers.Refusal | tuple[list[int], Copied]:
        """disagg: blocks of this worker's pool for the request, its KV copied into them."""
        assert self.source is not None
        granted = await self._allocate(owner, len(item.block_table))
        if not granted:  # refused, or unanswered: what an answer lost on its way granted goes
            await release_blocks(self.bus, self.unit, owner, self.pool)
            reason = f"no room for {len(item.block_table)} block(s) in the decode pool"
            return workers.Refusal(item.request_id, reason, retry=True)
        try:
            copied = await self.compute.run(
                copy_blocks, self.source, self.host.pool, item.block_table, granted
            )
        except (TransferError, RuntimeError) as err:  # mismatched tables; a device error
            logger.warning("KV copy of %s failed: %s", item.request_id, err)
            await release_blocks(self.bus, self.unit, owner, self.pool)
            return workers.Refusal(item.request_id, f"KV copy failed: {err}")
        return granted, copied

    async def hand_over(self, timeout_s: float) -> tuple[int, int]:
        """Give every resident to the replacement worker: let the step in hand finish, start
        no other, and send them all in one admission (same blocks, output so far). What it
        took is released here; what it refused goes back to the scheduler as preempted (it is
        recomputed, with the same output). Returns (handed over, preempted)."""
        self.accepting = False
        self._frozen = True
        self._work.set()
        await self._idle.wait()
        await self._apply_controls()  # cancels and preemptions that came in since
        items = tuple(r.handover_item() for r in self.residents.values())
        if not items:
            return 0, 0
        try:
            reply = await self.bus.request(
                workers.decode_admit_subject(self.unit),
                encode(workers.DecodeAdmit(items)),
                timeout_s,
            )
            taken = set(decode(reply.data, workers.DecodeAdmitted).request_ids)
        except (BusTimeout, ProtoError) as err:
            logger.warning("hand-over of %d request(s) failed: %s", len(items), err)
            taken = set()
        preempted = []
        for resident in list(self.residents.values()):
            self.residents.pop(resident.request_id)
            await self._release(resident)  # the replacement holds its own references now
            if resident.request_id not in taken:
                preempted.append(resident.preempted_event())
        if preempted:
            await self._events(tuple(preempted))
        return len(items) - len(preempted), len(preempted)

    def control(self, control: workers.DecodeControl) -> None:
        self._controls.append(control)
        self._work.set()

    async def _apply_controls(self) -> None:
        controls, self._controls = self._controls, []
        for control in controls:
            owners = control.swap_owners or ("",) * len(control.request_ids)
            for request_id, swap_owner in zip(control.request_ids, owners, strict=True):
                resident = self.residents.pop(request_id, None)
                if resident is None:
                    continue
                if control.kind != workers.ControlKind.PREEMPT:
                    await self._release(resident)
                    await self._end_stream(resident, control.finish_reason, control.error)
                    continue
                if swap_owner and self.host_tier is not None:
                    # Copied on a thread of its own while the next steps run (FastSwitch): its
                    # blocks go back, and the scheduler hears, once the copy is done.
                    swap = asyncio.create_task(self._preempt_by_swap(resident, swap_owner))
                    self._swaps.add(swap)
                    swap.add_done_callback(self._swaps.discard)
                    continue
                await self._release(resident)
                await self._events((resident.preempted_event(),))

    async def _preempt_by_swap(self, resident: Resident, owner: str) -> None:
        event = await self._swap_out(resident, owner) or resident.preempted_event()
        await self._release(resident)
        await self._events((event,))

    async def finish_swaps(self) -> None:
        """Wait for the swap-outs under way (each ends by releasing and reporting)."""
        if self._swaps:
            await asyncio.gather(*self._swaps, return_exceptions=True)
        self._copier.shutdown(wait=True)

    async def _copy(
        self, source: KVPool, target: KVPool, source_ids: Sequence[int], target_ids: Sequence[int]
    ) -> Copied:
        gpu = next((p.tensor.device for p in (source, target) if p.tensor.is_cuda), None)
        if gpu is not None and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(gpu)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._copier, copy_blocks, source, target, source_ids, target_ids, self._copy_stream
        )

    async def _swap_out(self, resident: Resident, owner: str) -> workers.WorkerEvent | None:
        """Copy the request's KV into host-tier blocks taken for `owner` (the scheduler's),
        before its own blocks go back; the PREEMPTED event that says where it is. Blocks the
        host tier holds a copy of already (`host_kept`: an earlier swap, an earlier turn) are
        not copied again. None when it cannot (no host tier, no room there, a failed copy):
        it is recomputed instead."""
        tier = self.host_tier
        if tier is None or resident.num_computed <= 0:
            return None
        count = -(-resident.num_computed // self.host.pool.block_size)
        kept = min(resident.host_kept, count)
        granted: list[int] = []
        seconds = 0.0
        if count > kept:
            granted = await self._allocate(owner, count - kept, kv.HOST_POOL)
            if not granted:  # refused, or unanswered: what a lost answer granted goes back
                await release_blocks(self.bus, self.unit, owner, kv.HOST_POOL)
                return None
            source = resident.block_table[kept:count]
            try:
                seconds = (await self._copy(self.host.pool, tier, source, granted)).seconds
            except (TransferError, RuntimeError) as err:
                logger.warning(
                    "swap-out of %s failed, recomputed instead: %s", resident.request_id, err
                )
                await release_blocks(self.bus, self.unit, owner, kv.HOST_POOL)
                return None
        return workers.WorkerEvent(
            workers.EventKind.PREEMPTED,
            resident.request_id,
            output_token_ids=tuple(resident.output),
            host_block_ids=tuple(granted),
            swap_s=seconds,
            host_kept=kept,
        )

    async def load(self, load: workers.KvLoad) -> workers.KvLoaded | ErrorReply:
        """Copy host-tier blocks into blocks of the unit pool that `load.owner` holds (a
        prompt's earlier turns: cache.PrefixMatch.host_block_ids). The target blocks are
        retained under an owner of this worker's for the copy, only while `load.owner` holds
        them: a late load never writes blocks given to another request meanwhile."""
        tier = self.host_tier
        if tier is None:
            return ErrorReply("unavailable", "this worker has no host tier")
        self._loads += 1
        owner = f"{self.holder}/load-{self._loads}"
        retain = kv.RetainBlocks(owner, load.block_ids, (load.owner,))
        refusal = await self._retain(owner, retain)
        if refusal is not None:
            return ErrorReply("unavailable", refusal.reason)
        try:
            copied = await self._copy(tier, self.host.pool, load.host_block_ids, load.block_ids)
        except (TransferError, RuntimeError) as err:
            return ErrorReply("internal_error", f"KV load failed: {err}")
        finally:
            await release_blocks(self.bus, self.unit, owner, self.pool)
        return workers.KvLoaded(copied.blocks, copied.seconds)

    async def _swap_in(self, item: workers.DecodeItem, block_table: list[int]) -> str | None:
        """Fill the request's first blocks from the host tier (its swapped-out KV); why not,
        or None once done. The scheduler releases the host blocks after the admission."""
        tier = self.host_tier
        if tier is None:
            return "this decode worker has no host tier"
        start, count = item.host_start, len(item.host_block_ids)
        if start < 0 or start + count > len(block_table):
            return f"{count} swapped blocks from {start} for a table of {len(block_table)}"
        targets = block_table[start : start + count]
        try:  # on a thread of its own: the blocks are new to this request, no step reads
            # them yet, and waiting for the model thread would hold the scheduler's loop for a
            # whole step (a mixed one: up to a second on a CPU)
            await self._copy(tier, self.host.pool, item.host_block_ids, targets)
        except (TransferError, RuntimeError) as err:
            return f"swap-in failed: {err}"
        return None

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await self._apply_controls()
            if self._frozen:
                self._idle.set()
                await asyncio.Future()  # until stopped: the residents belong to another worker
            # A snapshot: admissions land in self.residents while _has_room awaits kv_manager.
            active = [r for r in list(self.residents.values()) if await self._has_room(r)]
            if not active and not self._prefills:
                self.compute.set_active(False)  # its cores are the other worker's meanwhile
                self._step_ends.clear()  # an idle gap is no step's time
                self._step_batches.clear()
                self._work.clear()
                stalled = bool(self.residents)
                with_timeout = self.settings.needs_blocks_repeat_s if stalled else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), with_timeout)
                continue
            if self.lease is not None:
                await self.lease.wait_valid()  # a step never writes past the lease
                if self._frozen:
                    continue
                active = [r for r in active if r.request_id in self.residents]
            prefill = self._prefills.pop(0) if self._prefills else None
            if prefill is not None:
                await self._mixed_step(active, prefill)
                continue
            if active:
                self.compute.set_active(True)
                await self._step(active, started)

    async def _mixed_step(self, active: list[Resident], prefill: "_PendingPrefill") -> None:
        """A prefill batch and a decode step in one forward pass (unified mode)."""
        try:
            output, outcome = await self.compute.run(mixed_step, self.host, prefill.batch, active)
        except RuntimeInputError as err:  # the prompts were checked: a decoding request's fault
            await self._fail_all(active, str(err))
            self._prefills.insert(0, prefill)  # computed alone at the next step
            return
        except BaseException as err:
            prefill.output.set_exception(err)
            raise
        prefill.output.set_result(output)
        streams = streams_of(prefill.batch)
        traces = {item.request_id: item.traceparent for item in prefill.batch.items}
        for chunk in output.tokens:  # first tokens share the step's batches
            with traced_as(traces[chunk.request_id], "prefill.first_token"):
                self.outbox.add(streams[chunk.request_id], chunk)
        await self._after_step(active, outcome)
        await self._recheck(active, outcome)

    async def _step(self, active: list[Resident], started: float) -> None:
        context = sum(r.num_computed + 1 for r in active)
        forward_start = time.perf_counter()
        try:
            outcome = await self.compute.run(decode_step, self.host, active)
            forward_s = time.perf_counter() - forward_start
        except RuntimeInputError as err:  # a request the model refuses fails alone
            await self._fail_all(active, str(err))
            return
        await self._after_step(active, outcome)
        cycle_s = time.perf_counter() - started
        self.step_log.record(len(active), context, forward_s, cycle_s, self.compute.threads)
        await self._recheck(active, outcome)

    async def _recheck(self, active: list[Resident], outcome: StepOutcome) -> None:
        """KVShare's decode stage, for the residents it is due for (still decoding here)."""
        finished = {r.request_id for r in outcome.finished}
        live = [r for r in active if r.request_id not in finished]
        due = recheck_due(live, self.recheck.interval)
        if not due:
            return
        try:
            again = await self.compute.run(recheck_residents, self.host, due, self.recheck)
        except RuntimeInputError as err:  # left as placed: the answer goes on without it
            logger.warning("decode stage skipped: %s", err)
            return
        self.recheck_recomputed += again

    async def _fail_all(self, active: list[Resident], why: str) -> None:
        """End each request with an error saying why (its client sees it) and tell the
        scheduler it failed (so its record goes); give back its blocks."""
        failed = []
        for resident in active:
            self.residents.pop(resident.request_id, None)
            await self._release(resident)
            await self._end_stream(resident, FinishReason.ERROR, why)
            failed.append(
                workers.WorkerEvent(workers.EventKind.FAILED, resident.request_id, reason=why)
            )
        if failed:
            await self._events(tuple(failed))

    async def _after_step(self, active: list[Resident], outcome: StepOutcome) -> None:
        """Publish the new tokens (one batch per stream); release and report the finished."""
        self._step_ends.append(time.perf_counter())
        self._step_batches.append(len(active))
        for resident, chunk in zip(active, outcome.tokens, strict=True):
            self.outbox.add(resident.stream, chunk)
        await self.outbox.flush()
        finished = []
        for resident in outcome.finished:
            self.residents.pop(resident.request_id, None)
            with traced_as(resident.traceparent, "decode.finished"):
                await self._release(resident)
            finished.append(
                workers.WorkerEvent(
                    workers.EventKind.FINISHED,
                    resident.request_id,
                    num_output_tokens=len(resident.output),
                )
            )
        if finished:
            await self._events(tuple(finished))

    async def _has_room(self, resident: Resident) -> bool:
        """Whether the block table has a slot for the token this step writes; takes growth
        blocks if not. A refusal stalls the request and asks the scheduler to preempt."""
        block_size = self.host.pool.block_size
        needed = resident.num_computed // block_size + 1 - len(resident.block_table)
        if needed <= 0:
            return True
        count = max(needed, self.settings.growth_blocks)
        granted = await self._allocate(resident.owner, count) or await self._allocate(
            resident.owner, needed
        )
        if granted:
            resident.block_table.extend(granted)
            resident.stalled_since = None
            return True
        await self._ask_for_blocks(resident, needed)
        return False

    async def _ask_for_blocks(self, resident: Resident, needed: int) -> None:
        now = time.monotonic()
        last = self._last_needs_blocks.get(resident.request_id)
        if resident.stalled_since is None:
            resident.stalled_since = now
        if last is not None and now - last < self.settings.needs_blocks_repeat_s:
            return
        self._last_needs_blocks[resident.request_id] = now
        event = workers.WorkerEvent(
            workers.EventKind.NEEDS_BLOCKS, resident.request_id, blocks_needed=needed
        )
        await self._events((event,), roll_call=True)

    async def roll_call(self) -> None:
        """List every resident for the scheduler (WorkerEvents.roll_call)."""
        await self._events((), roll_call=True)

    def recent_step_s(self) -> float | None:
        """Seconds per step lately (mean_step_s), None before enough steps in a row."""
        return mean_step_s(self._step_ends)

    def recent_step_batch(self) -> float | None:
        """Requests per step over the same steps as recent_step_s (None when it is)."""
        if mean_step_s(self._step_ends) is None:
            return None
        return sum(self._step_batches) / len(self._step_batches)

    # --- kv_manager and the scheduler -----------------------------------------------------

    async def _allocate(self, owner: str, count: int, pool: str | None = None) -> list[int]:
        """`count` blocks of this worker's pool (or of `pool`) for `owner`; [] when refused."""
        target = self.pool if pool is None else pool
        try:
            reply = await self.bus.request(
                subjects.kv(self.unit, "alloc", target), encode(kv.AllocateBlocks(owner, count))
            )
            answer = decode(reply.data, kv.BlocksGranted, ErrorReply)
        except (BusTimeout, ProtoError) as err:
            logger.warning("kv_manager unavailable for %s: %s", owner, err)
            return []
        if isinstance(answer, ErrorReply):
            return []
        if target == self.pool:
            self._free_blocks = answer.num_free
        return list(answer.block_ids)

    async def _release(self, resident: Resident) -> None:
        """Give a finished request's blocks back (sent again if lost: `release_blocks`)."""
        self._last_needs_blocks.pop(resident.request_id, None)
        answer = await release_blocks(self.bus, self.unit, resident.owner, self.pool)
        if answer is not None:
            self._free_blocks = answer.num_free

    def forget_all(self, why: str) -> None:
        """The lease is lost: every resident's blocks are someone else's now. Stop at once,
        writing, releasing and answering nothing for them (kv_manager told the scheduler,
        which fails or retries them); a prefill waiting for a step fails with `why`."""
        self._frozen = True
        self.accepting = False
        self.residents.clear()
        for pending in self._prefills:
            pending.output.set_exception(RuntimeError(why))
        self._prefills.clear()
        self._work.set()

    async def release_all(self, why: str) -> None:
        """Stop holding anything: every request still here fails with `why` (never left
        waiting), and its blocks come back. Errors on the way are logged, not raised."""
        try:
            await self._fail_all(list(self.residents.values()), why)
        except Exception:  # the bus may be gone; kv_manager's lease sweep frees the rest
            logger.exception("could not end %d request(s) at stop", len(self.residents))
        self.residents.clear()

    async def _events(
        self, events: tuple[workers.WorkerEvent, ...], roll_call: bool = False
    ) -> None:
        """Report `events`; with `roll_call`, the size of every resident too."""
        sizes: tuple[workers.ResidentSize, ...] = ()
        step_s = step_batch = None
        if roll_call:
            sizes = tuple(
                workers.ResidentSize(r.request_id, len(r.output), len(r.block_table))
                for r in self.residents.values()
            )
            step_s, step_batch = self.recent_step_s(), self.recent_step_batch()
        message = workers.WorkerEvents(
            self.holder, events, self._free_blocks, self.pool, sizes, roll_call, step_s, step_batch
        )
        try:
            await self.bus.publish(workers.worker_events_subject(self.unit), encode(message))
        except (nats.errors.Error, BusError, OSError) as err:  # NATS away, its buffer full
            logger.warning("could not report %d event(s): %r", len(events), err)

    async def _end_stream(
        self, resident: Resident, reason: FinishReason, error: str | None
    ) -> None:
        chunk = TokenChunk(
            resident.request_id, len(resident.output), (), finish_reason=reason, error=error
        )
        await self.outbox.send(resident.stream, chunk)
