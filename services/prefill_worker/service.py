"""The prefill worker: maps the unit's storage, runs the prefill batches the scheduler sends,
publishes each request's first token on its stream and reports back.

The scheduler owns a prompt's blocks; while a batch writes them the worker holds references of
its own (`<holder>/batch-<id>`), under its own lease, so that kv_manager never frees a block a
live batch writes, and stops this process before freeing them if its lease lapses.

In unified mode (DUET_MODE=unified) it is the unit's only worker: it decodes too
(unit_worker/decoding.py), on the whole device, and each prefill batch joins the next decode
step as one forward pass (chunked prefill beside decode, the vLLM-style baseline)."""

import asyncio
import logging
import time

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from duetserve.common.health import serve_health
from duetserve.common.lifecycle import cancel_tasks, critical_task
from duetserve.common.nats_bus import Bus, BusTimeout
from duetserve.common.token_outbox import TokenOutbox
from duetserve.common.tracing import traced_as
from duetserve.common.unit_client import Lease, fetch_storage, release_blocks
from duetserve.proto import kv, subjects, workers
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply, HealthStatus
from duetserve.services.prefill_worker.settings import PrefillSettings
from duetserve.services.unit_worker.compute import (
    WorkerCompute,
    follow_splits,
    watch_model_thread,
)
from duetserve.services.unit_worker.decoding import Decoding
from duetserve.services.unit_worker.handover import announce_ready, follow_handover
from duetserve.services.unit_worker.model_host import ModelHost, host_model
from duetserve.services.unit_worker.prefill_step import run_prefill, streams_of
from duetserve.services.unit_worker.step_log import StepLog, attended_keys

logger = logging.getLogger(__name__)
SERVICE = "prefill_worker"


class PrefillWorkerService:
    def __init__(self, settings: PrefillSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_name(SERVICE)
        self.bus: Bus | None = None
        self.status = HealthStatus.STARTING
        self.host: ModelHost | None = None
        self.compute: WorkerCompute | None = None
        self.decoding: Decoding | None = None  # unified mode
        self.tokens_computed = 0
        self._batches: Subscription | None = None
        self._in_flight = 0  # batches being computed
        self.lease: Lease | None = None
        self.outbox: TokenOutbox | None = None  # first tokens (unified mode: the step sends them)
        self._tasks: list[asyncio.Task[None]] = []
        self.step_log = StepLog(settings.step_log_dir, "prefill")

    async def start(self) -> None:
        s = self.settings
        self.bus = bus = await Bus.connect(
            s.nats_url,
            self.instance,
            request_timeout_s=s.request_timeout_s,
            access=s.nats_access(SERVICE),
        )
        description = await fetch_storage(bus, s.unit, self.instance)
        self.compute = compute = await asyncio.to_thread(WorkerCompute.open, s, "prefill")
        compute.attach_activity(s, description.region)
        await follow_splits(bus, compute, s, self.instance)
        self.host = await compute.run(host_model, description, s.sampler_seed)
        watchdog = watch_model_thread(compute, s.model_call_timeout_s)
        self._tasks.append(critical_task(watchdog, "model-watchdog"))
        if s.mode == "unified":
            self.decoding = Decoding(bus, self.host, s, self.instance, compute)
            await self.decoding.start()
            self.lease = self.decoding.lease
        else:
            self.outbox = TokenOutbox(bus, self.instance)
            await self.outbox.start()
            interval = s.heartbeat_interval_s
            self.lease = Lease(bus, s.unit, self.instance, interval, writes=True)
            self._tasks.append(critical_task(self.lease.keep(), "prefill-lease"))
        self._batches = await bus.subscribe(
            workers.prefill_batch_subject(s.unit), self.on_batch, queue=SERVICE
        )
        await follow_handover(bus, s, self.instance, self._hand_over)
        await serve_health(bus, SERVICE, self.instance, lambda: self.status)
        self.status = HealthStatus.READY
        await announce_ready(bus, s, self.instance)

    async def _hand_over(self) -> tuple[int, int]:
        """A replacement serves: it takes the batches from now on; the ones in hand finish
        here, and in unified mode it gets every decoding request too."""
        self.status = HealthStatus.DRAINING
        if self._batches is not None:
            await self._batches.unsubscribe()
            self._batches = None
        while self._in_flight:
            await asyncio.sleep(0.01)
        if self.decoding is None:
            return 0, 0
        return await self.decoding.hand_over()

    async def on_batch(self, msg: Msg) -> None:
        assert self.bus is not None and self.host is not None and self.compute is not None
        try:
            batch = decode(msg.data, workers.PrefillBatch)
        except ProtoError as err:
            await self.bus.reply(msg, encode(ErrorReply(err.code, str(err))))
            return
        started = time.perf_counter()
        owner = workers.batch_owner(self.instance, batch.batch_id)
        # The blocks it writes, and those reused spans are copied from (held by the requests'
        # owners as well until the answer).
        blocks = tuple(
            sorted(
                {b for item in batch.items for b in item.block_table}
                | {b for item in batch.items for s in item.reuse for b in s.source_block_ids}
            )
        )
        owners = tuple(sorted({item.owner for item in batch.items if item.owner}))
        refused = await self._hold(owner, blocks, owners)
        if refused is not None:
            results = tuple(workers.PrefillResult(i.request_id, error=refused) for i in batch.items)
            await self.bus.reply(msg, encode(workers.PrefillDone(batch.batch_id, results)))
            return
        try:  # the references are held until the answer is out (see _answer)
            await self._answer(msg, batch, started)
        finally:
            await self._let_go(owner)

    async def _answer(self, msg: Msg, batch: workers.PrefillBatch, started: float) -> None:
        """Compute the batch, publish each first token, answer the scheduler. The batch's
        references outlive all of it: a worker killed before its answer is out still holds
        them, so its lease lapses with the batch named in it, and the scheduler stops waiting
        for an answer that will never come (SchedulerCore.abort_prefill)."""
        assert self.bus is not None and self.host is not None and self.compute is not None
        self._in_flight += 1
        try:
            if self.decoding is not None:
                # the step checks the lease, and sends the first tokens with its own
                output = await self.decoding.stepper.prefill(batch)
            else:
                assert self.lease is not None
                await self.lease.wait_valid()  # the batch never writes past the lease
                self.compute.set_active(True)
                try:
                    output = await self.compute.run(run_prefill, self.host, batch)
                finally:
                    self.compute.set_active(self._in_flight > 1)
        finally:
            self._in_flight -= 1
        forward_s = time.perf_counter() - started
        tokens = sum(len(item.token_ids) for item in batch.items)
        self.tokens_computed += tokens
        if self.outbox is not None:  # the first tokens reach the clients before the hand-off
            streams = streams_of(batch)
            traces = {item.request_id: item.traceparent for item in batch.items}
            for chunk in output.tokens:
                with traced_as(traces[chunk.request_id], "prefill.first_token"):
                    self.outbox.add(streams[chunk.request_id], chunk)
            await self.outbox.flush()
        await self.bus.reply(msg, encode(workers.PrefillDone(batch.batch_id, output.results)))
        context = sum(attended_keys(i.num_cached_tokens, len(i.token_ids)) for i in batch.items)
        cycle_s = time.perf_counter() - started
        self.step_log.record(tokens, context, forward_s, cycle_s, self.compute.threads)

    async def _hold(
        self, owner: str, blocks: tuple[int, ...], held_by: tuple[str, ...]
    ) -> str | None:
        """References of this worker's own on the batch's blocks, only if the requests still
        hold them; why not, if refused (the scheduler gave up on the batch, or its lease
        lapsed, and the blocks were freed: the batch must not write them)."""
        assert self.bus is not None
        subject = subjects.kv(self.settings.unit, "retain")
        retain = kv.RetainBlocks(owner, blocks, held_by)
        try:
            reply = await self.bus.request(subject, encode(retain))
            answer = decode(reply.data, kv.BlocksGranted, ErrorReply)
        except (BusTimeout, ProtoError) as err:
            # kv_manager may have granted it with the answer lost (NATS went away): let go of
            # whatever the batch's owner may hold, or this worker, renewing its lease all
            # along, would keep those blocks for as long as it lives.
            await self._let_go(owner)
            return f"could not hold the batch's blocks: {err}"
        if isinstance(answer, ErrorReply):
            return f"could not hold the batch's blocks: {answer.message}"
        return None

    async def _let_go(self, owner: str) -> None:
        """Drop the batch's references. Sent again if lost (`release_blocks`): a worker that
        lives on renews its lease, and a lost release would keep the blocks for ever."""
        assert self.bus is not None
        await release_blocks(self.bus, self.settings.unit, owner)

    async def ready(self) -> bool:
        healthy = self.decoding is None or self.decoding.healthy()
        return self.host is not None and healthy and all(not t.done() for t in self._tasks)

    async def drain(self) -> None:
        self.status = HealthStatus.DRAINING
        if self.decoding is not None:
            await self.decoding.drain()
        if self.bus is not None:
            await self.bus.drain()  # finishes the batch in hand, takes no more

    async def stop(self) -> None:
        if self.decoding is not None:
            await self.decoding.stop()
        await cancel_tasks(self._tasks)
        if self.bus is not None:
            await self.bus.close()
        if self.host is not None:
            self.host.close()
        if self.compute is not None:
            self.compute.close()
        self.step_log.close()
