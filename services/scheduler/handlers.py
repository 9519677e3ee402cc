"""Handlers of the subjects the scheduler serves: submissions, cancels, worker events."""

import logging
import time
from collections import OrderedDict

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.tracing import current_traceparent
from duetserve.common.unit_client import release_blocks
from duetserve.proto import kv, workers
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.scheduling import (
    CancelRequest,
    RequestStatus,
    RequestStatusQuery,
    ResumeRequest,
    SchedulerStats,
    SchedulerStatsQuery,
    SubmitAccepted,
    SubmitRequest,
)
from duetserve.services.scheduler.card import PrefixSummary
from duetserve.services.scheduler.core import SchedulerCore
from duetserve.services.scheduler.requests import RequestRecord
from duetserve.services.scheduler.state import Phase, grow
from duetserve.services.scheduler.targets import tpot_target_s, ttft_target_s

logger = logging.getLogger(__name__)


# Cancels of requests the scheduler does not know, kept this long: a cancel can overtake its
# submit (they arrive on two subscriptions, in no set order), and the submit is then refused.
EARLY_CANCEL_TTL_S = 60.0
EARLY_CANCELS_KEPT = 4096


class SchedulerHandlers:
    def __init__(self, bus: Bus, core: SchedulerCore, unit: str, holder: str) -> None:
        """`holder`: the kv_manager holder this scheduler takes blocks as, and the instance
        name it answers status queries with."""
        self.bus, self.core, self.unit, self.holder = bus, core, unit, holder
        self.accepting = True
        self.preemptions = 0
        self.prefixes = PrefixSummary()  # the prompts it accepted lately, for the unit's card
        self._early_cancels: OrderedDict[str, float] = OrderedDict()  # request id -> when

    async def on_submit(self, msg: Msg) -> None:
        try:
            submit = decode(msg.data, SubmitRequest)
        except ProtoError as err:
            await self.bus.reply(msg, encode(ErrorReply(err.code, str(err))))
            return
        if not self.accepting:
            await self.bus.reply(msg, encode(ErrorReply("draining", "the scheduler is draining")))
            return
        if self._cancelled_early(submit.request_id):
            error = ErrorReply("cancelled", f"request {submit.request_id} was cancelled already")
            await self.bus.reply(msg, encode(error))
            return
        if submit.request_id in self.core.records:
            error = ErrorReply("duplicate_request", f"request {submit.request_id} already exists")
            await self.bus.reply(msg, encode(error))
            return
        record = RequestRecord.new(submit, time.monotonic(), self.holder)
        refusal = self._refusal(submit, record)
        if refusal is not None:
            await self.bus.reply(msg, encode(refusal))
            return
        record.traceparent = current_traceparent()  # the handler runs in the submit's trace
        self.prefixes.add(
            submit.tenant,
            submit.prompt_token_ids,
            self.core.planner.config.block_size,
            submit.public_prefix_tokens,
        )
        self.core.records[submit.request_id] = record
        self.core.view.waiting.append(record.seq)
        self.core.tuner.on_arrival(len(submit.prompt_token_ids))
        await self.bus.reply(msg, encode(SubmitAccepted(submit.request_id)))
        self.core.peek_later(record)
        self.core.wake.set()

    def _refusal(self, submit: SubmitRequest, record: RequestRecord) -> ErrorReply | None:
        """Why not to take this request: it can never run here, or not within its SLO now (a
        resubmission, already accepted once, is let in). When it would start is reckoned
        behind what the policy would admit before it, and under the policy's running cap."""
        too_long = self.core.too_long(submit)
        if too_long is not None:
            return ErrorReply("prompt_too_long", too_long)
        if submit.output_token_ids:
            return None
        core = self.core
        view, planner = core.view, core.planner
        order = list(
            planner.policy.admission_order([*view.waiting, record.seq], record.seq.arrival)
        )
        ahead = order[: order.index(record.seq)]
        cap = planner.policy.running_cap()
        limit = None if cap is None else min(cap, core.admission.limit)
        refusal = core.admission.check(submit, view, ahead, limit)
        if refusal is None:
            return None
        logger.info("refused %s: %s", submit.request_id, refusal.message)
        return ErrorReply("overloaded", refusal.message, refusal.retry_after_s)

    async def on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(msg.data, CancelRequest)
        except ProtoError as err:
            logger.warning("dropped a malformed cancel: %s", err)
            return
        record = self.core.records.get(cancel.request_id)
        if record is None:  # already finished, or its submit is still on its way
            self._remember_early_cancel(cancel.request_id)
            return
        record.cancelled = cancel.reason.value
        phase = record.seq.phase
        if phase == Phase.WAITING:
            await self.core.finish(record)
        elif phase == Phase.DECODING:
            await self.core.cancel_decoding(record)
        else:  # PREFILLING: it ends once no chunk of it is in flight (SchedulerCore._step)
            self.core.wake.set()

    def _remember_early_cancel(self, request_id: str) -> None:
        now = time.monotonic()
        self._early_cancels[request_id] = now
        self._early_cancels.move_to_end(request_id)
        while self._early_cancels and (
            len(self._early_cancels) > EARLY_CANCELS_KEPT
            or next(iter(self._early_cancels.values())) < now - EARLY_CANCEL_TTL_S
        ):
            self._early_cancels.popitem(last=False)

    def _cancelled_early(self, request_id: str) -> bool:
        when = self._early_cancels.pop(request_id, None)
        return when is not None and when >= time.monotonic() - EARLY_CANCEL_TTL_S

    async def on_status(self, msg: Msg) -> None:
        """Which of the queried requests this scheduler still runs (ingress's stream watch)."""
        try:
            query = decode(msg.data, RequestStatusQuery)
        except ProtoError as err:
            await self.bus.reply(msg, encode(ErrorReply(err.code, str(err))))
            return
        known = tuple(r for r in query.request_ids if r in self.core.records)
        await self.bus.reply(msg, encode(RequestStatus(self.holder, known)))

    async def on_resume(self, msg: Msg) -> None:
        """A migrating request's client says how far it got: it goes on from there."""
        try:
            resume = decode(msg.data, ResumeRequest)
        except ProtoError as err:
            logger.warning("dropped a malformed resume: %s", err)
            return
        record = self.core.records.get(resume.request_id)
        if record is None or record.migrating_since is None:
            logger.info("resume of %s, which is not migrating: ignored", resume.request_id)
            return
        await self.core.resume(record, resume.output_token_ids)

    async def on_stats(self, msg: Msg) -> None:
        try:
            decode(msg.data, SchedulerStatsQuery)
        except ProtoError as err:
            await self.bus.reply(msg, encode(ErrorReply(err.code, str(err))))
            return
        core = self.core
        view, decode_pool, transfers = core.view, core.decode_view, core.transfers
        stats = SchedulerStats(
            waiting=len(view.waiting),
            prefilling=len(view.prefilling),
            decoding=len(view.decoding),
            free_blocks=view.free_blocks,
            total_blocks=view.total_blocks,
            preemptions=self.preemptions + self.core.policy_preemptions,
            prefill_share=core.tuner.prefill_share,
            split_moves=core.tuner.moves,
            decode_free_blocks=decode_pool.free_blocks if core.disagg else None,
            decode_total_blocks=decode_pool.total_blocks if core.disagg else None,
            kv_copies=transfers.copies,
            kv_copied_bytes=transfers.nbytes,
            kv_copy_s=transfers.seconds,
            running_limit=core.planner.max_running,
            swaps_out=core.swaps.swapped_out,
            swaps_in=core.swaps.swapped_in,
            swap_blocks_copied=core.swaps.blocks_out,
            swap_blocks_kept=core.swaps.blocks_kept,
            host_blocks_loaded=core.swaps.blocks_loaded,
            reuse_prefills=core.reuse.prefills,
            reuse_prompt_tokens=core.reuse.prompt_tokens,
            reused_tokens=core.reuse.reused,
            reuse_recomputed_tokens=core.reuse.recomputed,
            reuse_deviation_sum=core.reuse.deviation_sum,
        )
        await self.bus.reply(msg, encode(stats))

    async def on_worker_events(self, msg: Msg) -> None:
        try:
            events = decode(msg.data, workers.WorkerEvents)
        except ProtoError as err:
            logger.warning("dropped malformed worker events: %s", err)
            return
        if events.kv_pool == kv.HOST_POOL:
            await self._host_tier_events(events)
            return
        if events.free_blocks is not None:
            view = self.core.pool_view(events.kv_pool)
            if view is not None:
                view.free_blocks = events.free_blocks
            else:
                logger.warning("free blocks of an unknown pool %r ignored", events.kv_pool)
        grow(self.core.decode_view.decoding, events.residents)
        if events.roll_call:
            await self.core.roll_call(events.source, {r.request_id for r in events.residents})
            if events.step_s is not None:
                self._observe_steps(events.step_s, events.step_batch)
        for event in events.events:
            await self._on_event(event)
        self.core.wake.set()

    async def _host_tier_events(self, events: workers.WorkerEvents) -> None:
        """kv_manager on the host tier: the only news is swapped-out KV lost with a lapsed
        lease (the scheduler's). Those requests are recomputed instead; nothing else of
        theirs is lost."""
        for event in events.events:
            record = self.core.records.get(event.request_id)
            lost = event.kind == workers.EventKind.LEASES_EXPIRED
            if lost and record is not None and (record.swapped or record.host_copy):
                logger.warning("host-tier KV of %s lost: recomputed", record.request_id)
                swapped = record.swapped
                record.swapped, record.seq.swapped, record.host_copy = (), False, ()
                if swapped and record.seq.phase == Phase.PREFILLING:  # prefill past the cache's
                    record.seq.num_computed = record.seq.num_cached
        self.core.wake.set()

    async def _on_event(self, event: workers.WorkerEvent) -> None:
        batch = workers.batch_of(event.request_id)
        if event.kind == workers.EventKind.LEASES_EXPIRED and batch is not None:
            self.core.abort_prefill(batch, event.reason)  # its worker will never answer
            return
        record = self.core.records.get(event.request_id)
        if record is None:
            if event.host_block_ids:  # swapped out after it ended here (a cancel, a failure)
                owner = f"{self.holder}/{event.request_id}"
                await release_blocks(self.bus, self.unit, owner, kv.HOST_POOL)
            return
        kind = event.kind
        if kind in (workers.EventKind.FINISHED, workers.EventKind.FAILED):
            # Its final count, for the policy's last look at it (fairness charges it).
            record.seq.num_output = max(record.seq.num_output, event.num_output_tokens)
            if kind == workers.EventKind.FINISHED and record.first_token_at is not None:
                decode_s = time.monotonic() - record.first_token_at
                self.core.tuner.on_finished(
                    decode_s,
                    event.num_output_tokens,
                    tpot_target_s(record.submit.slo),
                    record.first_token_at - record.seq.arrival,
                    ttft_target_s(record.submit.slo),
                )
                self._observe_tpot(record, decode_s, event.num_output_tokens)
            if record.seq.phase == Phase.DECODING:
                await self.core.forget(record)  # the decode worker gave back what it held
            else:  # its hand-off's answer was lost: the scheduler holds its blocks still
                await self.core.finish(record)
        elif kind == workers.EventKind.PREEMPTED:
            if record.seq.phase != Phase.DECODING:  # as above: recomputed into new blocks
                await self.core.release(record.owner)
            self._requeue(record, event.output_token_ids)
            if event.host_block_ids or event.host_kept:  # its KV waits in the host tier
                self._swapped_out(record, event)
        elif kind == workers.EventKind.NEEDS_BLOCKS:
            await self._preempt_for(record, event.blocks_needed)
        elif kind == workers.EventKind.LEASES_EXPIRED:
            await self._lost(record, event.reason)

    def _swapped_out(self, record: RequestRecord, event: workers.WorkerEvent) -> None:
        """Its KV is in the host tier: the blocks the swap copied after the ones its host copy
        held already. If the host copy was lost meanwhile (a lapsed host-tier lease), the KV
        is not whole there: it is recomputed, and its host blocks go back when it ends."""
        kept = record.host_copy[: event.host_kept]
        if len(kept) < event.host_kept:
            logger.warning("host copy of %s lost during its swap: recomputed", record.request_id)
            record.host_copy = ()
            return
        bs = self.core.planner.config.block_size
        record.swapped = (*kept, *event.host_block_ids)
        record.seq.swapped = True
        record.host_copy = record.swapped[: (len(record.kv_token_ids) - 1) // bs]
        copied = len(event.host_block_ids)
        self.core.swaps.observe(copied * bs, event.swap_s, copied, len(kept))
        logger.info(
            "swapped out %s: %d host blocks in %.1f ms (%d held there already)",
            record.request_id,
            copied,
            1e3 * event.swap_s,
            len(kept),
        )

    def _observe_tpot(self, record: RequestRecord, decode_s: float, tokens: int) -> None:
        """What its TPOT says of how many may run at once (admission.py)."""
        target = tpot_target_s(record.submit.slo)
        if tokens < 2 or target is None:
            return
        view = self.core.view
        running = len(view.prefilling) + len(view.decoding)
        admission = self.core.admission
        admission.on_tpot(decode_s / (tokens - 1), target, running, record.first_token_at)
        self.core.planner.running_limit = admission.limit

    def _observe_steps(self, step_s: float, batch: float | None) -> None:
        """The decode worker's seconds per step at its mean batch, against the tightest TPOT
        target of the requests decoding: what a finish would say, said every roll call
        (admission.py); and one more point of the step time against batch size."""
        targets = [
            r.submit.slo.tpot_ms / 1000
            for r in self.core.records.values()
            if r.seq.phase == Phase.DECODING and r.submit.slo and r.submit.slo.tpot_ms
        ]
        view = self.core.view
        running = len(view.prefilling) + len(view.decoding)
        target = min(targets) if targets else None
        self.core.admission.on_step_time(step_s, target, running, batch)
        self.core.planner.running_limit = self.core.admission.limit

    def _requeue(self, record: RequestRecord, output_token_ids: tuple[int, ...]) -> None:
        self.core.unlist(record)
        record.requeue_after_preemption(output_token_ids)
        self.core.view.waiting.append(record.seq)

    async def _preempt_for(self, record: RequestRecord, blocks_needed: int) -> None:
        """Reclaim prefix-cache blocks first (cheapest: nothing is recomputed); preempt only
        if the cache could not give back enough. The decode worker retries on its own. (In
        disagg mode the cache's blocks are in the unit pool, not decode's: straight to
        preemption, against decode's pool.)"""
        core = self.core
        if not core.disagg and await core.evict(blocks_needed) >= blocks_needed:
            return
        await core.refresh_free(kv.DECODE_POOL if core.disagg else kv.UNIT_POOL)
        result = core.planner.preempt(core.decode_view, record.seq, blocks_needed, time.monotonic())
        for failure in result.fail:
            await self.core.fail(self.core.records[failure.request_id], failure.reason)
        if result.victims:
            owners = self.core.swap_owners(result.victims)
            logger.info(
                "preempting by %s",
                "swap" if any(owners) else "recompute",
                extra={"victims": list(result.victims), "for": record.request_id},
            )
            self.preemptions += len(result.victims)
            self.core.mark_preempting(result.victims)
            control = workers.DecodeControl(
                workers.ControlKind.PREEMPT, result.victims, swap_owners=owners
            )
            await self.bus.publish(workers.decode_control_subject(self.unit), encode(control))

    async def _lost(self, record: RequestRecord, reason: str) -> None:
        """A holder of this request's blocks stopped heart-beating. Before decode nothing was
        streamed past what the scheduler knows, so the request starts again; in decode only its
        client knows the tokens so far, so it migrates (SchedulerCore.migrate)."""
        if record.seq.phase == Phase.DECODING:
            await self.core.migrate(record, reason)
            return
        if record.seq in self.core.view.prefilling:
            self.core.view.prefilling.remove(record.seq)
            record.requeue_after_preemption(tuple(record.output_token_ids))
            self.core.view.waiting.append(record.seq)
