"""Decoding on a unit worker: the step loop over the requests resident on it, the subjects the
scheduler drives it by (admissions, controls) and the heartbeat that keeps its blocks leased.

The decode worker runs this in semi-pd mode; in unified mode the prefill worker runs it too,
and its prefill batches join the loop's steps (one forward pass computes both)."""

import asyncio
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from duetserve.common.lifecycle import cancel_tasks, critical_task
from duetserve.common.nats_bus import Bus
from duetserve.common.token_outbox import TokenOutbox
from duetserve.common.unit_client import Lease, LeaseLost, fetch_storage
from duetserve.proto import kv, workers
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.runtime.kv_pool import KVPool
from duetserve.services.kv_manager.cuda_ipc import PinnedHostMemory, import_cudart
from duetserve.services.unit_worker.compute import WorkerCompute
from duetserve.services.unit_worker.model_host import MappedPool, ModelHost, map_pool
from duetserve.services.unit_worker.settings import UnitWorkerSettings
from duetserve.services.unit_worker.stepper import DecodeStepper

logger = logging.getLogger(__name__)
QUEUE = "decode_worker"  # one queue group for admissions, whichever process decodes
HANDOVER_TIMEOUT_S = 30.0
HANDOVER_ROUNDS = 5
HANDOVER_SETTLE_S = 0.1


class Decoding:
    def __init__(
        self,
        bus: Bus,
        host: ModelHost,
        settings: UnitWorkerSettings,
        holder: str,
        compute: WorkerCompute,
        pool: str = kv.UNIT_POOL,
        source: KVPool | None = None,
    ) -> None:
        """`pool` and `source`: see DecodeStepper (disagg mode's own pool and its source).
        `holder` writes the pool under a lease (`self.lease`) that no step outlives."""
        self.bus, self.settings, self.holder, self.pool = bus, settings, holder, pool
        interval = settings.heartbeat_interval_s
        self.lease = Lease(bus, settings.unit, holder, interval, pool, writes=True)
        # The tokens of every step, and in unified mode every first token too.
        self.outbox = TokenOutbox(bus, holder)
        self.stepper = DecodeStepper(
            bus, host, settings, holder, compute, self.outbox, pool, source, self.lease
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._admissions: Subscription | None = None
        self.compute = compute
        self.host_tier: MappedPool | None = None
        self.pinned: PinnedHostMemory | None = None  # the host tier, page-locked, on a GPU

    async def start(self) -> None:
        s = self.settings
        if s.host_kv_mb > 0 and self.pool == kv.UNIT_POOL:
            # Preempted requests' KV goes to the host tier and comes back from it (swaps).
            # disagg mode keeps recomputing: its KV already moves between two pools.
            description = await fetch_storage(self.bus, s.unit, self.holder, kv.HOST_POOL)
            self.host_tier = await self.compute.run(map_pool, description)
            self.stepper.host_tier = self.host_tier.pool
            if self.stepper.host.pool.tensor.is_cuda:  # DMA copies, on a stream of their own
                tier = self.host_tier.pool.tensor
                self.pinned = await asyncio.to_thread(PinnedHostMemory, import_cudart(), tier)
        await self.outbox.start()
        self._admissions = await self.bus.subscribe(
            workers.decode_admit_subject(s.unit), self.on_admit, queue=QUEUE
        )
        await self.bus.subscribe(workers.decode_control_subject(s.unit), self.on_control)
        if self.host_tier is not None:  # earlier turns' KV loaded back from the host tier
            await self.bus.subscribe(workers.kv_load_subject(s.unit), self.on_load, queue=QUEUE)
        self._tasks = [
            critical_task(self.stepper.run(), "decode-loop"),
            critical_task(self._keep_lease(), "decode-lease"),
            critical_task(self._roll_calls(), "decode-roll-call"),
        ]

    async def _keep_lease(self) -> None:
        """Heart-beat; fenced off, drop every resident at once (their blocks are someone
        else's, and kv_manager has told the scheduler) and stop: the supervisor starts a new
        worker, a new holder."""
        try:
            await self.lease.keep()
        except LeaseLost as err:
            self.stepper.forget_all(str(err))
            raise

    async def _roll_calls(self) -> None:
        while True:
            await asyncio.sleep(workers.ROLL_CALL_S)
            await self.stepper.roll_call()

    async def on_admit(self, msg: Msg) -> None:
        try:
            admit = decode(msg.data, workers.DecodeAdmit)
        except ProtoError as err:
            await self.bus.reply(msg, encode(ErrorReply(err.code, str(err))))
            return
        admitted = await self.stepper.admit(admit.items)
        await self.bus.reply(msg, encode(admitted))

    async def on_load(self, msg: Msg) -> None:
        try:
            load = decode(msg.data, workers.KvLoad)
        except ProtoError as err:
            await self.bus.reply(msg, encode(ErrorReply(err.code, str(err))))
            return
        await self.bus.reply(msg, encode(await self.stepper.load(load)))

    async def on_control(self, msg: Msg) -> None:
        try:
            control = decode(msg.data, workers.DecodeControl)
        except ProtoError as err:
            logger.warning("dropped a malformed control: %s", err)
            return
        self.stepper.control(control)

    async def hand_over(self) -> tuple[int, int]:
        """A replacement serves now: leave the admissions to it and give it every resident
        (DecodeStepper.hand_over). An admission already under way when this starts lands
        after the first round, so rounds repeat until none is left. Returns (handed over,
        preempted)."""
        if self._admissions is not None:
            await self._admissions.unsubscribe()
            self._admissions = None
        handed = preempted = 0
        for _ in range(HANDOVER_ROUNDS):
            moved, lost = await self.stepper.hand_over(HANDOVER_TIMEOUT_S)
            handed, preempted = handed + moved, preempted + lost
            await asyncio.sleep(HANDOVER_SETTLE_S)
            if not self.stepper.residents:
                break
        return handed, preempted

    def healthy(self) -> bool:
        return all(not t.done() for t in self._tasks)

    async def drain(self) -> None:
        """Take no new requests; let the resident ones finish."""
        self.stepper.accepting = False
        while self.stepper.residents:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop the loop and the heartbeat, give back every block still held."""
        await cancel_tasks(self._tasks)
        await self.stepper.finish_swaps()
        await self.stepper.release_all("the decode worker stopped before the request finished")
        self.stepper.step_log.close()
        if self.host_tier is not None:
            self.stepper.host_tier = None
            if self.pinned is not None:
                self.pinned.close()
                self.pinned = None
            self.host_tier.close()
            self.host_tier = None
