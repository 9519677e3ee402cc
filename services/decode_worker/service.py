"""The decode worker: owns its step loop over the requests resident on it.

The scheduler admits requests (with their block tables); the worker retains their blocks under
its own holder, then steps them without asking anyone: growth blocks come from kv_manager a few
at a time ahead of need; when kv_manager says no, the request stalls and the scheduler is told,
which preempts (DecodeControl). Controls and admissions are applied between steps, never during
one, so the step in flight always sees a consistent batch.
"""

import asyncio
import logging

from nats.aio.msg import Msg

from duetserve.common.health import serve_health
from duetserve.common.lifecycle import cancel_tasks, critical_task
from duetserve.common.nats_bus import Bus
from duetserve.common.unit_client import fetch_storage, heartbeat_forever
from duetserve.proto import workers
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply, HealthStatus
from duetserve.services.decode_worker.settings import DecodeSettings
from duetserve.services.decode_worker.stepper import DecodeStepper
from duetserve.services.unit_worker.compute import WorkerCompute, follow_splits
from duetserve.services.unit_worker.model_host import host_model

logger = logging.getLogger(__name__)
SERVICE = "decode_worker"


class DecodeWorkerService:
    def __init__(self, settings: DecodeSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_name(SERVICE)
        self.holder = self.instance  # kv_manager holder of every block this process retains
        self.bus: Bus | None = None
        self.status = HealthStatus.STARTING
        self.stepper: DecodeStepper | None = None
        self.compute: WorkerCompute | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        s = self.settings
        self.bus = bus = await Bus.connect(
            s.nats_url, self.instance, request_timeout_s=s.request_timeout_s
        )
        description = await fetch_storage(bus, s.unit, self.instance)
        self.compute = compute = await asyncio.to_thread(WorkerCompute.open, s, "decode")
        await follow_splits(bus, compute, s, self.instance)
        host = await compute.run(host_model, description, s.sampler_seed)
        self.stepper = DecodeStepper(bus, host, s, self.holder, compute)
        await bus.subscribe(workers.decode_admit_subject(s.unit), self.on_admit, queue=SERVICE)
        await bus.subscribe(workers.decode_control_subject(s.unit), self.on_control)
        self._tasks = [
            critical_task(self.stepper.run(), "decode-loop"),
            critical_task(
                heartbeat_forever(bus, s.unit, self.holder, s.heartbeat_interval_s),
                "decode-heartbeat",
            ),
        ]
        await serve_health(bus, SERVICE, self.instance, lambda: self.status)
        self.status = HealthStatus.READY

    async def on_admit(self, msg: Msg) -> None:
        assert self.bus is not None and self.stepper is not None
        try:
            admit = decode(msg.data, workers.DecodeAdmit)
        except ProtoError as err:
            await self.bus.reply(msg, encode(ErrorReply(err.code, str(err))))
            return
        admitted = await self.stepper.admit(admit.items)
        await self.bus.reply(msg, encode(admitted))

    async def on_control(self, msg: Msg) -> None:
        assert self.stepper is not None
        try:
            control = decode(msg.data, workers.DecodeControl)
        except ProtoError as err:
            logger.warning("dropped a malformed control: %s", err)
            return
        self.stepper.control(control)

    async def ready(self) -> bool:
        return self.stepper is not None and all(not t.done() for t in self._tasks)

    async def drain(self) -> None:
        """Take no new requests; let the resident ones finish."""
        self.status = HealthStatus.DRAINING
        if self.stepper is not None:
            self.stepper.accepting = False
            while self.stepper.residents:
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        if self.stepper is not None:
            await self.stepper.release_all()
            self.stepper.host.close()
            self.stepper.step_log.close()
        if self.compute is not None:
            self.compute.close()
        if self.bus is not None:
            await self.bus.close()
