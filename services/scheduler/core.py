"""The scheduler's loop over one unit: plan, admit (prefix cache, then blocks), run a prefill
batch, hand finished prompts to decode. The planner decides; this module talks.

Two prefill batches may be out at once (MAX_BATCHES_OUT): when a batch leaves prompts behind
(its token budget ran out), the next is planned, admitted and sent while it computes, and the
answer of the one before is settled (prefixes indexed, prompts handed to decode, blocks
released) while the next computes, so the worker never waits for this loop's round trips
between them. A request with a chunk out sits out the next plan.

Handlers for submissions, cancels and worker events run beside the loop on the same event loop;
they change records and wake the loop.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus, BusNoResponders, BusTimeout
from duetserve.common.token_outbox import TokenOutbox
from duetserve.common.tracing import traced_as
from duetserve.common.unit_client import release_blocks
from duetserve.proto import cache, kv, subjects, workers
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.scheduling import SubmitRequest
from duetserve.proto.tokens import FinishReason, TokenChunk
from duetserve.services.scheduler.admission import AdmissionControl
from duetserve.services.scheduler.planner import Admission, Planner, PrefillChunk
from duetserve.services.scheduler.policy.base import Rates
from duetserve.services.scheduler.requests import RequestRecord
from duetserve.services.scheduler.split_tuner import SplitTuner
from duetserve.services.scheduler.state import KvTransfers, Phase, UnitView
from duetserve.services.scheduler.targets import ttft_target_s

logger = logging.getLogger(__name__)
RETRY_WAITING_S = 0.5
# A prefill batch unanswered this many times longer than batches have taken per token (at
# least PREFILL_WAIT_FLOOR_S, at most prefill_timeout_s) is given up and its requests prefilled
# again: its answer was lost, or its worker died before it could say so. A request given up on
# PREFILL_ATTEMPTS times fails.
PREFILL_WAIT_FACTOR = 8.0
PREFILL_WAIT_FLOOR_S = 10.0
PREFILL_ATTEMPTS = 3
CAP_LOG_S = 5.0  # the policy's running cap is logged at most this often
# Prefill batches out at once: one computing, the next already at the worker.
MAX_BATCHES_OUT = 2
# A migrating request whose client has not said how far it got by then is forgotten (its
# ingress is gone too).
RESUME_WAIT_S = 30.0
# How long a request waits for a worker to exist (one that crashed is being started again):
# a prefill worker to take its prompt, a decode worker to take it over (holding its blocks
# meanwhile); then it fails.
NO_WORKER_WAIT_S = 60.0
# A roll call counts for this long; one that lists a request counts for it that long.
ROLL_CALL_FRESH_S = 3 * workers.ROLL_CALL_S
# A decoding request in no roll call for this long has ended on its worker unheard.
ROLL_CALL_MISSING_S = 2 * workers.ROLL_CALL_S


# Until a swap is measured: a copy of the KV of one token one way (SmolLM2 in bfloat16 holds
# 23 KB a token; host memory copies it at ~10 GB/s here, loadtest/swap_copy.py).
SWAP_S_PER_TOKEN_PRIOR = 2.5e-6


def prefer_swap(
    tokens: int,
    swap_s_per_token: float,
    prefill_s_per_token: float | None,
    kept_tokens: int = 0,
) -> bool:
    """Swap a preempted request's KV (out now, back later) rather than recompute it (prefill
    its tokens again), when that costs less. Out copies only what the host tier does not hold
    yet (`kept_tokens`: RequestRecord.host_copy); back copies it all. Before any prefill is
    measured, swap: a copy of a token's KV is far cheaper than computing it on every backend."""
    if tokens <= 0:
        return False
    if prefill_s_per_token is None:
        return True
    copied = 2 * tokens - min(kept_tokens, tokens)
    return copied * swap_s_per_token < tokens * prefill_s_per_token


@dataclass(frozen=True, slots=True)
class SpanReuse:
    """KVShare's reuse of cached spans (DUET_SPAN_REUSE): what each such prefill recomputes."""

    recompute: float  # of the reused tokens, those deviating most
    check_layer: int  # where deviation is measured
    num_layers: int  # the model's

    def charge(self, tokens: int, reused: int) -> int:
        """What a prefill of `tokens` placing `reused` of them costs, in tokens computed in
        every layer: the others in full, the reused in the layers up to the check layer, and
        the recomputed share of them in the rest."""
        early = (self.check_layer + 1) / self.num_layers
        share = self.recompute + (1 - self.recompute) * early
        return (tokens - reused) + math.ceil(reused * share)


@dataclass(slots=True)
class ReuseStats:
    """Prefills that reused cached spans, since the start."""

    prefills: int = 0
    prompt_tokens: int = 0  # of those prefills' prompts
    reused: int = 0  # tokens whose K/V were placed from spans
    recomputed: int = 0  # of those, computed again in every layer
    deviation_sum: float = 0.0  # of each prefill's mean deviation at the check layer

    def observe(self, prompt_tokens: int, result: workers.PrefillResult) -> None:
        self.prefills += 1
        self.prompt_tokens += prompt_tokens
        self.reused += result.reused
        self.recomputed += result.recomputed
        self.deviation_sum += result.deviation


@dataclass(slots=True)
class SwapStats:
    """Preemptions by swap: how many, and what a swap costs per token (what the decode
    workers reported, a moving average)."""

    swapped_out: int = 0
    swapped_in: int = 0
    failed: int = 0  # swap-ins that did not come back (recomputed)
    s_per_token: float = SWAP_S_PER_TOKEN_PRIOR
    blocks_out: int = 0  # blocks swap-outs copied to the host tier
    blocks_kept: int = 0  # blocks swap-outs did not copy: the host tier held them already
    blocks_loaded: int = 0  # earlier turns' blocks loaded back from the host tier

    def observe(self, tokens: int, seconds: float, blocks: int = 0, kept: int = 0) -> None:
        """One swap-out: `tokens` copied in `seconds`, in `blocks` blocks, `kept` not copied."""
        self.swapped_out += 1
        self.blocks_out += blocks
        self.blocks_kept += kept
        if tokens > 0 and seconds > 0:
            self.s_per_token = 0.8 * self.s_per_token + 0.2 * seconds / tokens


@dataclass(slots=True)
class BatchOut:
    """A prefill batch sent and not settled yet."""

    batch_id: int
    chunks: list[PrefillChunk]
    # Each request's preemption count when sent: a request requeued since (its worker lost,
    # say) and admitted again has new blocks, and this batch's answer is not about them.
    generations: dict[str, int]
    tokens: int
    sent_at: float  # monotonic
    reconnects: int  # the bus's reconnects when it went out
    request: "asyncio.Future[Msg]"
    # Set (with a reason) when it will never be answered: its prefill worker lost its lease
    # (dead, or frozen and stopped by kv_manager), or the connection dropped while it was out.
    lost: "asyncio.Future[str]"
    answered_at: float | None = None  # monotonic, when its answer came
    # Prompt tokens were left for a next batch when it was planned (its budget ran out): that
    # batch is planned and sent at once. Otherwise prompts arriving meanwhile wait for this
    # answer and go out together, not one by one as they trickle in (each batch a step).
    left_behind: bool = False

    def finished(self) -> bool:
        return self.request.done() or self.lost.done()


class SchedulerCore:
    def __init__(
        self,
        bus: Bus,
        planner: Planner,
        unit: str,
        num_blocks: int,
        prefill_timeout_s: float,
        tuner: SplitTuner,
        outbox: TokenOutbox,
        shared_steps: bool = False,
        decode_pool_blocks: int | None = None,
        admission: AdmissionControl | None = None,
    ) -> None:
        """`shared_steps`: prefill chunks share each forward pass with the decoding requests
        (unified mode), so the decodes take their tokens out of the batch's budget.
        `decode_pool_blocks`: disagg mode, where decoding requests live in a pool of their own
        (see `decode_view`)."""
        self.bus, self.planner, self.unit, self.tuner = bus, planner, unit, tuner
        self.outbox = outbox  # errors and migrating notices, on the requests' streams
        self.shared_steps = shared_steps
        self.prefill_timeout_s = prefill_timeout_s
        self.records: dict[str, RequestRecord] = {}
        self.view = UnitView(free_blocks=num_blocks, total_blocks=num_blocks)
        # The pool decoding requests hold blocks in, which preemption frees: the unit pool, or
        # in disagg mode the decode worker's own (same decoding list, its own counts).
        self.decode_view = self.view
        if decode_pool_blocks is not None:
            self.decode_view = UnitView(
                decode_pool_blocks, decode_pool_blocks, decoding=self.view.decoding
            )
        self.wake = asyncio.Event()
        self._batch_id = 0
        # Prefilled requests the decode worker had no room for yet, handed off again when it
        # may have some (at the loop's next wake).
        self.handoffs: list[RequestRecord] = []
        self.admission = admission or AdmissionControl(max_waiting=2**31, max_running=2**31)
        self._roll_calls: dict[str, tuple[float, set[str]]] = {}  # source -> (when, residents)
        self.transfers = KvTransfers()
        self._next_reclaim = 0.0  # monotonic time before which the cache is not asked again
        self.batches_out: deque[BatchOut] = deque()  # oldest first, as the worker runs them
        self._last_answer_at = 0.0  # monotonic: when the last batch settled was answered
        self._prefill_s_per_token: float | None = None  # the slowest recent batch's
        self.policy_preemptions = 0  # decoding requests the policy preempted
        # The unit has a host tier: preemption may swap KV out to it (`swap_owners`).
        self.host_tier = False
        self.swaps = SwapStats()
        # Spans of cached prompts found anywhere in a prompt are reused (KVShare); None: only
        # exact prefixes are.
        self.span_reuse: SpanReuse | None = None
        self.reuse = ReuseStats()
        # Ask the cache how much of each arriving prompt it holds (scheduling by hit rate).
        self.peek_hits = False
        self._peeks: set[asyncio.Task[None]] = set()
        self._logged_cap: int | None = None
        self._cap_logged_at = -CAP_LOG_S

    @property
    def disagg(self) -> bool:
        return self.decode_view is not self.view

    def pool_view(self, pool: str) -> UnitView | None:
        """The view counting the blocks of one of the unit's pools (None: not this mode's)."""
        if pool == kv.UNIT_POOL:
            return self.view
        return self.decode_view if pool == kv.DECODE_POOL and self.disagg else None

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                # Events wake the loop; requests left waiting (no blocks yet) are retried on a
                # short timer too, so no lost wake-up can strand them.
                waits = self.view.waiting or self.handoffs
                migrating = any(r.migrating_since is not None for r in self.records.values())
                retry_s = RETRY_WAITING_S if waits or migrating else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), retry_s)
                self.wake.clear()
                await self._retry_handoffs()
                await self._forget_unresumed(time.monotonic())
                while await self._step():
                    pass
        finally:
            for out in self.batches_out:  # the loop is stopped: nobody waits for them
                out.request.cancel()

    async def _retry_handoffs(self) -> None:
        """Hand off what waits for the decode worker (just prefilled, or refused for now)."""
        handoffs, self.handoffs = self.handoffs, []
        live = [r for r in handoffs if self.records.get(r.request_id) is r and r.cancelled is None]
        if live:
            await self._hand_off(live)

    async def _step(self) -> bool:
        """Send the next prefill batch if there is one and room for it; otherwise settle the
        oldest batch out once it is answered (a new request arriving meanwhile, with room for
        another batch, is planned at once). False when there is nothing to do right now."""
        # Handlers run while this awaits: a request may end (cancel, failure) at any await, so
        # records are looked up again after each one.
        for record in [r for r in self.records.values() if r.cancelled is not None]:
            if record.seq.phase == Phase.PREFILLING and not record.seq.in_flight:
                await self.finish(record)
        rejected = False
        if self._room_for_a_batch():
            sent, rejected = await self._plan_and_send()
            if sent:
                return True
        if not self.batches_out:
            return rejected
        oldest = self.batches_out[0]
        waits: set[asyncio.Future[Any]] = {oldest.request, oldest.lost}
        woken = None
        if self._room_for_a_batch():
            woken = asyncio.ensure_future(self.wake.wait())
            waits.add(woken)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if woken is not None:
                woken.cancel()
        if not oldest.finished():  # woken: plan again, with the batch still computing
            self.wake.clear()
            return True
        self.batches_out.popleft()
        await self._settle(oldest)
        return True

    def _room_for_a_batch(self) -> bool:
        out = self.batches_out
        return not out or (len(out) < MAX_BATCHES_OUT and out[-1].left_behind)

    async def _plan_and_send(self) -> tuple[bool, bool]:
        """Plan, admit and send a batch. (whether one went out, or the cache gave blocks back
        and it is worth planning again; whether requests were rejected)."""
        decode_tokens = 0
        if self.shared_steps:  # the prompts out now decode beside the next batch
            finishing = sum(c.is_last for out in self.batches_out for c in out.chunks)
            decode_tokens = len(self.view.decoding) + finishing
        now = time.monotonic()
        self.planner.rates = self._rates()
        plan = self.planner.plan(self.view, now, decode_tokens)
        self._log_cap(now)
        await self._preempt_for_policy(self.planner.policy.preemptions())
        for rejection in plan.reject:
            if (rejected := self.records.get(rejection.request_id)) is not None:
                await self.fail(rejected, rejection.reason)
        some_rejected = bool(plan.reject)
        if not plan.admit and self.view.waiting and await self._reclaim_for_waiting(now):
            return True, some_rejected
        admitted = {a.request_id for a in plan.admit if await self._admit(a)}
        swapped_in = [r for a in admitted if (r := self.records.get(a)) is not None and r.swapped]
        if swapped_in:  # straight to decode, its KV copied back there
            await self._hand_off(swapped_in)
        # Planned again: an admission that hit the prefix cache starts past the cached tokens,
        # and a chunk planned from before it would recompute them and overshoot the prompt.
        prefill = self.planner.prefill_chunks(self.view, now, decode_tokens)
        chunks = [c for c in prefill if self._still_prefilling(c.request_id, admitted)]
        if chunks:
            out = self._send_prefill(chunks)
            # Admitted prompts the budget had no room for (not those arriving meanwhile).
            out.left_behind = any(
                s.num_uncomputed > 0 and not s.in_flight for s in self.view.prefilling
            )
            return True, some_rejected
        return False, some_rejected

    def _log_cap(self, now: float) -> None:
        """Say what the policy caps the running requests at, when it changes (at most every
        CAP_LOG_S: it may change every ranking)."""
        cap = self.planner.policy.running_cap()
        if cap == self._logged_cap or now - self._cap_logged_at < CAP_LOG_S:
            return
        self._logged_cap, self._cap_logged_at = cap, now
        rates = self.planner.rates
        line = None if rates is None else rates.line
        step = "unmeasured" if line is None else f"{line.fixed_s:.4f}s + {line.per_request_s:.5f}s"
        logger.info(
            "the policy caps running requests at %s (%d running, %d waiting; step %s a request)",
            cap,
            len(self.view.prefilling) + len(self.view.decoding),
            len(self.view.waiting),
            step,
        )

    def _rates(self) -> Rates | None:
        step_s, per_token = self.admission.step_s, self.admission.prefill_s_per_token
        if step_s is None or per_token is None:
            return None
        return Rates(step_s, per_token, self.admission.steps.line())

    def mark_preempting(self, victims: Iterable[str]) -> None:
        """A PREEMPT is on its way to these: no victim twice, their blocks as good as free,
        until the PREEMPTED event (or, if the control was lost, a roll call that still lists
        them ROLL_CALL_FRESH_S later: `roll_call`)."""
        now = time.monotonic()
        for victim in victims:
            record = self.records.get(victim)
            if record is not None:
                record.seq.preempting = True
                record.preempt_sent_at = now

    async def _preempt_for_policy(self, victims: tuple[str, ...]) -> None:
        """Decoding requests the policy wants out (to run better ones): the decode worker
        stops them and reports how far each got; they come back as PREEMPTED events and wait
        to be recomputed, as after a memory preemption."""
        decoding = [
            v
            for v in victims
            if (r := self.records.get(v)) and r.seq.phase == Phase.DECODING and not r.seq.preempting
        ]
        if not decoding:
            return
        logger.info("preempting for the policy", extra={"victims": decoding})
        self.policy_preemptions += len(decoding)
        self.mark_preempting(decoding)
        ids = tuple(decoding)
        control = workers.DecodeControl(
            workers.ControlKind.PREEMPT, ids, swap_owners=self.swap_owners(ids)
        )
        await self.bus.publish(workers.decode_control_subject(self.unit), encode(control))

    def _still_prefilling(self, request_id: str, admitted: set[str]) -> bool:
        record = self.records.get(request_id)
        if record is None or record.cancelled is not None:
            return False
        return request_id in admitted or record.seq.phase == Phase.PREFILLING

    # --- admission ----------------------------------------------------------------------

    async def _admit(self, admission: Admission) -> bool:
        record = self.records.get(admission.request_id)
        if record is None:
            return False
        with traced_as(record.traceparent, "scheduler.admit"):
            return await self._admit_traced(record)

    async def _admit_traced(self, record: RequestRecord) -> bool:
        # A swapped request's KV comes back from the host tier, past what the prefix cache
        # still holds of it (whole blocks: the same KV, computed by the same prefill).
        # Another request's blocks in the host tier (an earlier turn) come back the same way,
        # loaded into its new blocks before prefill computes the rest.
        matched = await self._match_prefix(record)
        if matched.host_block_ids:
            record.host_copy = matched.host_block_ids
        needed = self.planner.blocks_for(len(record.kv_token_ids)) - len(matched.block_ids)
        granted = await self._allocate(record.owner, needed)
        if granted is None or self.records.get(record.request_id) is not record:
            await self.release(record.owner)  # no room, or it ended while we asked
            return False
        seq = record.seq
        record.block_table = [*matched.block_ids, *granted]
        cached = matched.num_tokens
        if not record.swapped and record.host_copy:
            cached = await self._load_host_copy(record, len(matched.block_ids), cached)
            if self.records.get(record.request_id) is not record:
                await self.release(record.owner)  # it ended while the KV was loaded
                return False
        seq.num_cached = seq.num_computed = cached
        # Spans past what is cached now (a host-tier load may have covered some); their
        # source blocks stay held until the prefill is answered (`_after_chunk`).
        record.span_blocks = matched.span_block_ids
        record.spans = tuple(s for s in matched.spans if s.start >= cached)
        record.first_kept = -1
        seq.whole = bool(record.spans)
        seq.charge = None
        if record.spans and self.span_reuse is not None:
            reused = sum(s.length for s in record.spans)
            seq.charge = self.span_reuse.charge(seq.prompt_len - cached, reused)
        if record.swapped:
            seq.num_computed = seq.prompt_len  # once swapped in
        seq.num_blocks = len(record.block_table)
        seq.phase = Phase.PREFILLING
        self.view.waiting.remove(seq)
        self.view.prefilling.append(seq)
        return True

    async def _load_host_copy(self, record: RequestRecord, matched: int, cached: int) -> int:
        """Fill the blocks after the prefix cache's `matched` from the request's host copy
        (one decode worker copies them); the tokens it need not compute now, `cached` when
        the copy adds nothing or fails (then they are computed)."""
        bs = self.planner.config.block_size
        # At least one token is left to compute: prefill samples from the last one's logits.
        usable = min(len(record.host_copy), (len(record.kv_token_ids) - 1) // bs)
        if usable <= matched:
            return cached
        load = workers.KvLoad(
            record.owner,
            record.host_copy[matched:usable],
            tuple(record.block_table[matched:usable]),
        )
        started = time.monotonic()
        try:
            reply = await self.bus.request(workers.kv_load_subject(self.unit), encode(load))
            answer = decode(reply.data, workers.KvLoaded, ErrorReply)
        except (BusTimeout, ProtoError) as err:
            logger.warning("KV of %s not loaded from the host tier: %s", record.request_id, err)
            return cached
        if isinstance(answer, ErrorReply):
            logger.warning(
                "KV of %s not loaded from the host tier: %s", record.request_id, answer.message
            )
            return cached
        self.swaps.blocks_loaded += answer.blocks
        logger.info(
            "loaded %d blocks of %s from the host tier in %.1f ms (copy %.1f ms)",
            answer.blocks,
            record.request_id,
            1e3 * (time.monotonic() - started),
            1e3 * answer.seconds,
        )
        return usable * bs

    def _cached_blocks(self, record: RequestRecord) -> int:
        """Blocks at the start of its table the prefix cache gave it (a swapped request's
        KV is copied back only after them)."""
        if not record.swapped:
            return 0
        return min(record.seq.num_cached // self.planner.config.block_size, len(record.swapped))

    def peek_later(self, record: RequestRecord) -> None:
        """Learn its expected hit rate in the background (it waits meanwhile as if none)."""
        if not self.peek_hits:
            return
        task = asyncio.create_task(self._peek_hit(record))
        self._peeks.add(task)
        task.add_done_callback(self._peeks.discard)

    async def _peek_hit(self, record: RequestRecord) -> None:
        query = cache.PrefixMatchQuery(
            owner="",
            tenant=record.submit.tenant,
            token_ids=record.kv_token_ids,
            public_prefix_tokens=record.submit.public_prefix_tokens,
            spans=self.span_reuse is not None,
            peek=True,
        )
        try:
            reply = await self.bus.request(subjects.cache(self.unit, "match"), encode(query))
            found = decode(reply.data, cache.PrefixMatch)
        except (BusTimeout, ProtoError) as err:
            logger.debug("no hit rate for %s: %s", record.request_id, err)
            return
        cached = found.num_tokens + sum(s.length for s in found.spans)
        record.seq.expected_hit = cached / max(len(record.kv_token_ids), 1)
        self.wake.set()

    async def _match_prefix(self, record: RequestRecord) -> cache.PrefixMatch:
        query = cache.PrefixMatchQuery(
            owner=record.owner,
            tenant=record.submit.tenant,
            token_ids=record.kv_token_ids,
            public_prefix_tokens=record.submit.public_prefix_tokens,
            # The host tier's index, for a request with no KV of its own there yet.
            host=self.host_tier and not record.swapped and not record.host_copy,
            spans=self.span_reuse is not None and not record.swapped,
        )
        try:
            reply = await self.bus.request(subjects.cache(self.unit, "match"), encode(query))
            return decode(reply.data, cache.PrefixMatch)
        except (BusTimeout, ProtoError) as err:
            logger.warning("prefix cache unavailable, computing everything: %s", err)
            return cache.PrefixMatch((), 0)

    async def _allocate(self, owner: str, count: int) -> list[int] | None:
        """Blocks from kv_manager; on a shortage the prefix cache gives some back, once. None
        when there is no room (or no answer: the request stays waiting and is retried)."""
        for attempt in range(2):
            try:
                reply = await self.bus.request(
                    subjects.kv(self.unit, "alloc"), encode(kv.AllocateBlocks(owner, count))
                )
                answer = decode(reply.data, kv.BlocksGranted, ErrorReply)
            except (BusTimeout, ProtoError) as err:
                logger.warning("kv_manager did not allocate for %s: %s", owner, err)
                return None
            if isinstance(answer, kv.BlocksGranted):
                self.view.free_blocks = answer.num_free
                return list(answer.block_ids)
            if attempt == 0:
                await self.evict(count)
        return None

    async def refresh_free(self, pool: str) -> None:
        """Ask kv_manager how many blocks a pool has free now. The count otherwise comes with
        replies and worker events, as their senders last knew it: a worker whose allocation
        was just refused reports a count from before, and preempting on it could free nothing;
        after the prefix cache evicts, nothing has told us yet."""
        view = self.pool_view(pool)
        assert view is not None, pool
        try:
            reply = await self.bus.request(
                subjects.kv(self.unit, "stats", pool), encode(kv.KvStatsQuery())
            )
            view.free_blocks = decode(reply.data, kv.KvStats).num_free
        except (BusTimeout, ProtoError) as err:
            logger.warning("kv_manager did not say how many blocks are free: %s", err)

    async def _reclaim_for_waiting(self, now: float) -> bool:
        """The next request to admit lacks blocks that the prefix cache may hold: ask it to
        give them back. Otherwise a pool filled by cached prefixes, with nothing decoding in
        it to run short and trigger an eviction, would keep the request waiting forever.
        True when the cache gave some back (plan again). After the cache had nothing, it is
        asked again only on the retry timer, not at every wake."""
        if now < self._next_reclaim:
            return False
        shortfall = self.planner.shortfall(self.view, now)
        if shortfall <= 0:
            return False
        if await self.evict(shortfall) == 0:
            self._next_reclaim = now + RETRY_WAITING_S
            return False
        await self.refresh_free(kv.UNIT_POOL)
        return True

    async def evict(self, count: int) -> int:
        """Ask the prefix cache to give back `count` blocks; how many it dropped (blocks that
        requests still use stay allocated until they end)."""
        try:
            reply = await self.bus.request(
                subjects.cache(self.unit, "evict"), encode(cache.EvictQuery(count))
            )
            return len(decode(reply.data, cache.Evicted).block_ids)
        except (BusTimeout, ProtoError) as err:
            logger.warning("prefix cache could not evict: %s", err)
            return 0

    async def release(self, owner: str) -> None:
        """Give back every block `owner` holds, asking again while kv_manager does not answer
        (`release_blocks`): a lost release would keep the blocks until the scheduler's own
        lease lapsed, that is for as long as it lived."""
        answer = await release_blocks(self.bus, self.unit, owner)
        if answer is not None:
            self.view.free_blocks = answer.num_free

    # --- prefill and hand-off -----------------------------------------------------------

    def _send_prefill(self, chunks: list[PrefillChunk]) -> BatchOut:
        """Send a batch; it is settled (`_settle`) once answered, oldest first."""
        self._batch_id += 1
        items = tuple(self._prefill_item(c) for c in chunks)
        batch = workers.PrefillBatch(self._batch_id, items)
        tokens = sum(c.num_tokens for c in chunks)
        # It is computed after the batches already out: its answer may wait for theirs too.
        ahead = sum(out.tokens for out in self.batches_out)
        wait_s = self._prefill_wait_s(ahead + tokens)
        request = asyncio.ensure_future(
            self.bus.request(workers.prefill_batch_subject(self.unit), encode(batch), wait_s)
        )
        generations = {}
        for chunk in chunks:
            seq = self.records[chunk.request_id].seq
            seq.in_flight = True
            generations[chunk.request_id] = seq.num_preemptions
        out = BatchOut(
            self._batch_id,
            chunks,
            generations,
            tokens,
            time.monotonic(),
            self.bus.reconnects,
            request,
            asyncio.get_running_loop().create_future(),
        )
        request.add_done_callback(lambda _: setattr(out, "answered_at", time.monotonic()))
        self.batches_out.append(out)
        return out

    def _landed(self, out: BatchOut) -> list[tuple[RequestRecord, PrefillChunk]]:
        """The batch is answered or given up: its requests may be planned again. Those still
        as they were when it went out, with their chunks."""
        current = []
        for chunk in out.chunks:
            record = self.records.get(chunk.request_id)
            if record is None or record.seq.num_preemptions != out.generations[chunk.request_id]:
                continue  # ended, or requeued (and maybe out again, with other blocks)
            record.seq.in_flight = False
            current.append((record, chunk))
        return current

    async def _settle(self, out: BatchOut) -> None:
        """The oldest batch out is answered, or will never be: take in its results (or
        prefill its requests again)."""
        request = out.request
        if not request.done():  # lost
            request.cancel()
        current = self._landed(out)
        if not request.done() or request.cancelled():  # a cancelled task is done only later
            await self._prefill_again(current, out.lost.result())
            return
        try:
            reply = request.result()
            done = decode(reply.data, workers.PrefillDone)
            # Computing began when it went out, or when the batch before it was answered.
            answered = out.answered_at or time.monotonic()
            took = answered - max(out.sent_at, self._last_answer_at)
            self._last_answer_at = answered
            self.tuner.on_prefill_batch(out.tokens, took)
            self._observe_prefill(out.tokens, took)
        except BusNoResponders as err:  # none runs now: a crashed one is starting again
            await self._prefill_again(current, str(err), counted=False)
            await asyncio.sleep(RETRY_WAITING_S)  # not a hot loop while it starts
            return
        except BusTimeout as err:
            await self._prefill_again(current, str(err))
            return
        except ProtoError as err:
            for record, _ in current:
                await self.fail(record, f"prefill failed: {err}")
            return
        results = {r.request_id: r for r in done.results}
        prefilled: list[tuple[RequestRecord, workers.PrefillResult]] = []
        for record, chunk in current:
            if self.records.get(record.request_id) is record:
                with traced_as(record.traceparent, "scheduler.prefilled"):
                    result = await self._after_chunk(record, chunk, results)
                if result is not None:
                    prefilled.append((record, result))
        # The batch's prefixes are indexed together, not one round trip after another; each
        # lands before its request finishes or is handed off (cache_index takes its own
        # references to the blocks before it answers, and only then may they be released).
        await asyncio.gather(*(self._insert_prefix(record) for record, _ in prefilled))
        for record, result in prefilled:
            if self.records.get(record.request_id) is not record:
                continue  # ended while the inserts were out (failed, or forgotten)
            if result.finished:
                await self.finish(record)
            else:
                self.handoffs.append(record)  # the batch's are handed off together
        await self._retry_handoffs()

    def _prefill_wait_s(self, tokens: int) -> float:
        if self._prefill_s_per_token is None:
            return self.prefill_timeout_s  # nothing measured yet (the first batch warms up)
        expected = PREFILL_WAIT_FACTOR * tokens * self._prefill_s_per_token
        return min(self.prefill_timeout_s, max(PREFILL_WAIT_FLOOR_S, expected))

    def _observe_prefill(self, tokens: int, seconds: float) -> None:
        """Seconds per token of the slowest recent batch (a slow one counts at once, and is
        forgotten slowly), and the throughput admission estimates with."""
        self.admission.on_prefill_batch(tokens, seconds)
        rate = seconds / max(tokens, 1)
        known = self._prefill_s_per_token
        self._prefill_s_per_token = rate if known is None else max(rate, 0.9 * known + 0.1 * rate)

    def abort_prefill(self, batch_id: int, reason: str) -> None:
        """The prefill worker of batch `batch_id` lost its lease: if that batch is still out,
        stop waiting for it (SchedulerCore._settle)."""
        for out in self.batches_out:
            if out.batch_id == batch_id and not out.lost.done():
                out.lost.set_result(reason)

    def connection_restored(self) -> None:
        """The bus came back after it dropped (nats-server restarted, say): a batch sent before
        may have lost its message or its answer with the server, and waiting for it would
        stall every prompt for its whole wait (10 s at least). It is given up now and its
        requests prefilled again; an answer that does come is ignored, and the worker's own
        block references keep its late writes off blocks handed elsewhere."""
        for out in self.batches_out:
            if out.reconnects < self.bus.reconnects and not out.lost.done():
                out.lost.set_result("the NATS connection dropped while it was out")

    async def _prefill_again(
        self, current: list[tuple[RequestRecord, PrefillChunk]], reason: str, counted: bool = True
    ) -> None:
        """The batch will not be answered (its worker is gone, or its answer was lost): nothing
        of these prompts reached a client, so each goes back to waiting, its blocks given back,
        and is prefilled again from the start. The blocks are safe to give back: a worker that
        still writes them holds references of its own (taken only while the request held
        them), so they are not freed before it is done."""
        logger.warning("prefill batch lost (%s): prefilling %d again", reason, len(current))
        for record, _ in current:
            if self.records.get(record.request_id) is not record:
                continue
            if record.seq.phase != Phase.PREFILLING:
                continue
            record.prefill_attempts += counted
            now = time.monotonic()
            record.no_worker_since = None if counted else (record.no_worker_since or now)
            waited = now - (record.no_worker_since or now)
            if record.prefill_attempts >= PREFILL_ATTEMPTS or waited > NO_WORKER_WAIT_S:
                await self.fail(record, f"prefill failed: {reason}")
                continue
            self.unlist(record)
            await self.release(record.owner)
            record.requeue_after_preemption(tuple(record.output_token_ids))
            self.view.waiting.append(record.seq)
        self.wake.set()

    def _prefill_item(self, chunk: PrefillChunk) -> workers.PrefillItem:
        record = self.records[chunk.request_id]
        tokens = record.kv_token_ids[chunk.start : chunk.start + chunk.num_tokens]
        reuse = self.span_reuse
        # Spans go with the one chunk that computes the whole rest of the prompt.
        whole = chunk.is_last and chunk.start == record.seq.num_cached
        spans = record.spans if reuse is not None and whole else ()
        return workers.PrefillItem(
            request_id=chunk.request_id,
            token_ids=tokens,
            num_cached_tokens=chunk.start,
            block_table=tuple(record.block_table),
            sample=record.sampling_state() if chunk.is_last else None,
            traceparent=record.traceparent,
            owner=record.owner,
            reuse=spans,
            recompute=reuse.recompute if spans and reuse else 0.0,
            check_layer=reuse.check_layer if spans and reuse else 1,
        )

    async def _after_chunk(
        self,
        record: RequestRecord,
        chunk: PrefillChunk,
        results: dict[str, workers.PrefillResult],
    ) -> workers.PrefillResult | None:
        """Takes in one chunk's result; returns it when the request's prompt is now prefilled
        (its first token sampled): the caller indexes its prefix, then finishes it or hands it
        off."""
        result = results.get(chunk.request_id)
        if result is None or result.error is not None:
            reason = result.error if result is not None else "no result from prefill"
            await self.fail(record, reason or "prefill failed")
            return None
        record.seq.num_computed += chunk.num_tokens
        if record.span_blocks:  # read by the prefill, which is over
            await self._release_span_blocks(record)
        if result.reused:
            record.first_kept = result.first_kept
            self.reuse.observe(len(record.kv_token_ids), result)
        if record.cancelled is not None:
            await self.finish(record)
            return None
        if not chunk.is_last:
            return None
        assert result.token is not None, "the last chunk samples a token"
        if not record.output_token_ids and record.seq.num_preemptions == 0:
            record.first_token_at = now = time.monotonic()
            self.tuner.on_first_token(now - record.seq.arrival, ttft_target_s(record.submit.slo))
        record.output_token_ids.append(result.token.token_id)
        record.seq.num_output = len(record.output_token_ids)
        return result

    async def _release_span_blocks(self, record: RequestRecord) -> None:
        blocks, record.span_blocks = record.span_blocks, ()
        release = kv.ReleaseBlocks(record.owner, blocks)
        try:
            reply = await self.bus.request(subjects.kv(self.unit, "release"), encode(release))
            answer = decode(reply.data, kv.BlocksReleased, ErrorReply)
        except (BusTimeout, ProtoError) as err:  # they go back with the rest at its end
            logger.warning("spans' blocks of %s kept until it ends: %s", record.request_id, err)
            return
        if isinstance(answer, ErrorReply):
            logger.warning("spans' blocks of %s not released: %s", record.request_id, answer)

    async def _insert_prefix(self, record: RequestRecord) -> None:
        # Only exact KV is indexed: with reused spans, the prompt up to the first placed K/V
        # that stood (reused KV is never reused again).
        computed = record.seq.num_computed
        exact = computed if record.first_kept < 0 else min(computed, record.first_kept)
        insert = cache.PrefixInsert(
            tenant=record.submit.tenant,
            token_ids=record.kv_token_ids[:exact],
            block_ids=tuple(record.block_table),
            public_prefix_tokens=record.submit.public_prefix_tokens,
            public_spans=record.submit.public_spans,
        )
        try:  # cache_index retains the blocks it adopts before it answers
            await self.bus.request(subjects.cache(self.unit, "insert"), encode(insert))
        except BusTimeout as err:
            logger.warning("prefix cache did not index %s: %s", record.request_id, err)

    async def _hand_off(self, records: list[RequestRecord]) -> None:
        """Give prefilled requests to the decode worker, all in one admission. With no worker
        to take them now (none runs: a crashed one is starting again; none answers: a frozen
        one, whose lease is lapsing), they keep their blocks and are offered again until
        NO_WORKER_WAIT_S has passed. A worker that answers late takes a request only while
        the scheduler still holds its blocks (DecodeItem.owner), and takes an offer of one it
        has already as accepted, so asking again is safe."""
        items = tuple(
            workers.DecodeItem(
                r.request_id,
                tuple(r.block_table),
                r.sampling_state(),
                r.traceparent,
                owner=r.owner,
                host_block_ids=r.swapped[self._cached_blocks(r) :],
                host_start=self._cached_blocks(r),
                host_kept=len(r.host_copy),
                reused=_span_ranges(r),
            )
            for r in records
        )
        try:
            reply = await self.bus.request(
                workers.decode_admit_subject(self.unit), encode(workers.DecodeAdmit(items))
            )
            admitted = decode(reply.data, workers.DecodeAdmitted)
        except BusTimeout as err:  # BusNoResponders too
            logger.warning(
                "hand-off of %d request(s) not answered, offered again: %s", len(records), err
            )
            now = time.monotonic()
            for record in records:
                record.no_worker_since = record.no_worker_since or now
                if now - record.no_worker_since < NO_WORKER_WAIT_S:
                    self.handoffs.append(record)
                else:
                    await self.fail(record, f"decode worker unavailable: {err}")
            return
        except ProtoError as err:
            for record in records:
                await self.fail(record, f"decode worker unavailable: {err}")
            return
        self.transfers.add(admitted)
        taken = set(admitted.request_ids)
        refusals = {r.request_id: r for r in admitted.refused}
        for record in records:
            record.no_worker_since = None
            if record.request_id in taken:
                await self._handed_off(record)
                continue
            refusal = refusals.get(record.request_id)
            if refusal is not None and refusal.retry:  # no room yet: it waits, holding its blocks
                self.handoffs.append(record)
                continue
            if refusal is not None and refusal.swap_failed and record.swapped:
                # Its KV did not come back: recomputed into the blocks it holds.
                logger.warning(
                    "swap-in of %s failed (%s): recomputed", record.request_id, refusal.reason
                )
                await self.drop_host(record)
                record.seq.num_computed = record.seq.num_cached  # the cache's blocks stay good
                self.swaps.failed += 1
                self.wake.set()
                continue
            reason = refusal.reason if refusal is not None else "no reason"
            await self.fail(record, f"decode refused: {reason}")

    async def _handed_off(self, record: RequestRecord) -> None:
        await self.release(record.owner)  # the decode worker holds its own references now
        if record.swapped:  # copied back by the decode worker before it said yes
            logger.info("swapped back in %s", record.request_id)
            await self._keep_host_copy(record)
            self.swaps.swapped_in += 1
        if (
            self.records.get(record.request_id) is not record
            or record.seq.phase != Phase.PREFILLING
        ):
            return  # while we waited it finished, was cancelled or preempted on the decode worker
        self.view.prefilling.remove(record.seq)
        record.seq.phase = Phase.DECODING
        record.decoding_since, record.unlisted_since = time.monotonic(), None
        self.view.decoding.append(record.seq)
        if record.cancelled is not None:  # the cancel arrived while the hand-off was under way
            await self.cancel_decoding(record)

    # --- migration ------------------------------------------------------------------------

    async def roll_call(self, source: str, resident: set[str]) -> None:
        """A decode worker listed its residents. A request decoding here that no worker has
        listed for ROLL_CALL_MISSING_S ended on its worker (finished, preempted, failed) with
        the event saying so lost on the bus: it migrates, and its client, who knows how far
        it got, has it go on from there (or, if it had finished, no longer listens, and the
        record is forgotten when no resume comes)."""
        now = time.monotonic()
        self._roll_calls[source] = (now, resident)
        fresh = {s: c for s, c in self._roll_calls.items() if now - c[0] <= ROLL_CALL_FRESH_S}
        self._roll_calls = fresh
        listed = set().union(*(ids for _, ids in fresh.values()))
        for record in list(self.records.values()):
            if record.seq.phase != Phase.DECODING or record.decoding_since is None:
                continue
            sent = record.preempt_sent_at
            if (
                record.request_id in resident
                and sent is not None
                and now - sent > ROLL_CALL_FRESH_S
            ):
                record.seq.preempting, record.preempt_sent_at = False, None  # the PREEMPT was lost
            if record.request_id in listed or now - record.decoding_since < ROLL_CALL_FRESH_S:
                record.unlisted_since = None
                continue
            record.unlisted_since = record.unlisted_since or now
            if now - record.unlisted_since >= ROLL_CALL_MISSING_S:
                await self.migrate(record, "no decode worker has it any more")

    async def migrate(self, record: RequestRecord, reason: str) -> None:
        """Its decode worker was lost with the tokens it produced: only the client knows how
        far it got. Ask (a migrating notice on its stream); ingress answers with a
        ResumeRequest, and `resume` sends it on from there."""
        logger.warning("request %s migrates: %s", record.request_id, reason)
        self.unlist(record)
        record.seq.phase = Phase.WAITING  # in no list until it resumes
        record.migrating_since = time.monotonic()
        index = len(record.output_token_ids)
        notice = TokenChunk(record.request_id, index, (), migrating=True)
        await self.outbox.send(record.submit.stream, notice)
        self.wake.set()  # the retry timer looks for requests that never resume

    async def resume(self, record: RequestRecord, output_token_ids: tuple[int, ...]) -> None:
        """Go on from the output the client has: recomputed from prompt + that output, with
        the same sampling state (seeded), so the rest is what it would have been."""
        record.migrating_since = None
        if len(output_token_ids) >= record.submit.sampling.max_tokens:
            last = TokenChunk(
                record.request_id, len(output_token_ids), (), finish_reason=FinishReason.LENGTH
            )
            await self.outbox.send(record.submit.stream, last)
            await self.forget(record)
            return
        record.requeue_after_preemption(output_token_ids)
        self.view.waiting.append(record.seq)
        self.wake.set()

    async def _forget_unresumed(self, now: float) -> None:
        for record in list(self.records.values()):
            since = record.migrating_since
            if since is not None and now - since > RESUME_WAIT_S:
                logger.warning("request %s never resumed: forgotten", record.request_id)
                await self.forget(record)

    async def cancel_decoding(self, record: RequestRecord) -> None:
        """Stop a request on the decode worker, which releases its blocks and ends its stream
        (finish reason "stop" for a stop string, "abort" for a client that went away)."""
        reason = FinishReason.STOP if record.cancelled == "stop_string" else FinishReason.ABORT
        control = workers.DecodeControl(workers.ControlKind.CANCEL, (record.request_id,), reason)
        await self.bus.publish(workers.decode_control_subject(self.unit), encode(control))
        await self.forget(record)

    # --- endings --------------------------------------------------------------------------

    def too_long(self, submit: SubmitRequest) -> str | None:
        """Why this request can never run on the unit (its prompt outgrows the whole pool)."""
        tokens = len(submit.prompt_token_ids) + len(submit.output_token_ids)
        needed = self.planner.blocks_for(tokens)
        if needed <= self.view.total_blocks:
            return None
        return (
            f"The prompt of {tokens} tokens needs {needed} KV blocks; the server has "
            f"{self.view.total_blocks} in all."
        )

    def unlist(self, record: RequestRecord) -> None:
        """Take the request out of whichever phase list holds it."""
        for group in (self.view.waiting, self.view.prefilling, self.view.decoding):
            if record.seq in group:
                group.remove(record.seq)

    async def forget(self, record: RequestRecord) -> None:
        """It ended: out of every list; its host-tier blocks go to the host tier's index (for
        the conversation's next turn) or back."""
        if self.records.pop(record.request_id, None) is not None:
            self.admission.on_finished()  # a place to run came free
        self.unlist(record)
        await self.drop_host(record, keep=True)

    async def finish(self, record: RequestRecord) -> None:
        """Ended while the scheduler held it: give its blocks back (host-tier ones too)."""
        await self.forget(record)
        if record.seq.phase != Phase.DECODING:
            await self.release(record.owner)
        self.wake.set()

    async def drop_host(self, record: RequestRecord, *, keep: bool = False) -> None:
        """Give back its host-tier blocks (swapped-out KV, host copy). With `keep`, its host
        copy goes to the host tier's index first, which keeps what it has no copy of."""
        if not record.swapped and not record.host_copy:
            return
        copy = record.host_copy
        record.swapped, record.seq.swapped, record.host_copy = (), False, ()
        if keep and copy:
            bs = self.planner.config.block_size
            insert = cache.PrefixInsert(
                tenant=record.submit.tenant,
                token_ids=record.kv_token_ids[: len(copy) * bs],
                block_ids=copy,
                public_prefix_tokens=record.submit.public_prefix_tokens,
                pool=kv.HOST_POOL,
            )
            try:  # cache_index retains what it adopts before it answers
                await self.bus.request(subjects.cache(self.unit, "insert"), encode(insert))
            except BusTimeout as err:
                logger.warning("host tier's index did not keep %s: %s", record.request_id, err)
        await release_blocks(self.bus, self.unit, record.owner, kv.HOST_POOL)

    async def _keep_host_copy(self, record: RequestRecord) -> None:
        """Swapped back in: its full blocks stay in the host tier as its host copy (a later
        swap-out copies only past them); the last, partial one goes back."""
        bs = self.planner.config.block_size
        full = min((len(record.kv_token_ids) - 1) // bs, len(record.swapped))
        record.host_copy, surplus = record.swapped[:full], record.swapped[full:]
        record.swapped, record.seq.swapped = (), False
        if surplus:
            await self.release_host(record.owner, surplus)

    async def release_host(self, owner: str, block_ids: Sequence[int]) -> None:
        """Give back some of an owner's host-tier blocks (all of them go when it ends)."""
        release = kv.ReleaseBlocks(owner, tuple(block_ids))
        try:
            await self.bus.request(subjects.kv(self.unit, "release", kv.HOST_POOL), encode(release))
        except BusTimeout as err:
            logger.warning("host blocks of %s not released yet: %s", owner, err)

    def swap_owners(self, victims: tuple[str, ...]) -> tuple[str, ...]:
        """For a PREEMPT of `victims`: the owner to swap each one's KV out under, or "" to
        recompute it (DecodeControl.swap_owners). The cost rule: a swap copies the KV out and
        back (twice its bytes at the measured swap rate); recompute prefills it again (at the
        measured prefill rate). Swap when that is cheaper and the unit has a host tier."""
        if not self.host_tier:
            return ()
        prefill = self.admission.prefill_s_per_token
        owners = []
        for victim in victims:
            record = self.records.get(victim)
            if record is None:
                owners.append("")
                continue
            bs = self.planner.config.block_size
            kept = len(record.host_copy) * bs
            swap = prefer_swap(len(record.kv_token_ids), self.swaps.s_per_token, prefill, kept)
            owners.append(record.owner if swap else "")
        return tuple(owners)

    async def fail(self, record: RequestRecord, reason: str) -> None:
        """Fail a request: the client gets the reason on its stream. A decoding request is the
        decode worker's to stop; it publishes the error and releases the blocks."""
        logger.warning("request %s failed: %s", record.request_id, reason)
        if record.seq.phase == Phase.DECODING:
            control = workers.DecodeControl(
                workers.ControlKind.CANCEL, (record.request_id,), FinishReason.ERROR, reason
            )
            await self.bus.publish(workers.decode_control_subject(self.unit), encode(control))
            await self.forget(record)
            return
        await self.publish_error(record, reason)
        await self.finish(record)

    async def publish_error(self, record: RequestRecord, reason: str) -> None:
        chunk = TokenChunk(
            record.request_id,
            len(record.output_token_ids),
            (),
            finish_reason=FinishReason.ERROR,
            error=reason,
        )
        await self.outbox.send(record.submit.stream, chunk)


def _span_ranges(record: RequestRecord) -> tuple[int, ...]:
    """Where its prompt's K/V were placed from spans, as DecodeItem.reused's pairs (none when
    its prefill did not reuse them)."""
    if record.first_kept < 0:
        return ()
    return tuple(p for s in record.spans for p in (s.start, s.start + s.length))
