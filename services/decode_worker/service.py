"""The decode worker: owns its step loop over the requests resident on it.

The scheduler admits requests (with their block tables); the worker retains their blocks under
its own holder, then steps them without asking anyone: growth blocks come from kv_manager a few
at a time ahead of need; when kv_manager says no, the request stalls and the scheduler is told,
which preempts (DecodeControl). Controls and admissions are applied between steps, never during
one, so the step in flight always sees a consistent batch. (The loop itself is
unit_worker/decoding.py, which the prefill worker also runs in unified mode.) In disagg mode it
decodes on its own pool and weight copy, and copies each admitted request's KV into it.
"""

import asyncio
import logging

from duetserve.common.health import serve_health
from duetserve.common.lifecycle import cancel_tasks, critical_task
from duetserve.common.nats_bus import Bus
from duetserve.common.unit_client import fetch_storage
from duetserve.proto import kv
from duetserve.proto.common import HealthStatus
from duetserve.services.decode_worker.settings import DecodeSettings
from duetserve.services.unit_worker.compute import (
    WorkerCompute,
    follow_splits,
    watch_model_thread,
)
from duetserve.services.unit_worker.decoding import Decoding
from duetserve.services.unit_worker.handover import announce_ready, follow_handover
from duetserve.services.unit_worker.model_host import MappedPool, ModelHost, host_model, map_pool

logger = logging.getLogger(__name__)
SERVICE = "decode_worker"


class DecodeWorkerService:
    def __init__(self, settings: DecodeSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_name(SERVICE)
        self.holder = self.instance  # kv_manager holder of every block this process retains
        self.bus: Bus | None = None
        self.status = HealthStatus.STARTING
        self.host: ModelHost | None = None
        self.source: MappedPool | None = None  # disagg: the unit pool, KV copied out of it
        self.decoding: Decoding | None = None
        self.compute: WorkerCompute | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        s = self.settings
        if s.mode == "unified":
            raise RuntimeError(
                "DUET_MODE=unified runs no decode worker: the prefill worker decodes"
            )
        self.bus = bus = await Bus.connect(
            s.nats_url,
            self.instance,
            request_timeout_s=s.request_timeout_s,
            access=s.nats_access(SERVICE),
        )
        # disagg: the model runs on this worker's own pool and weight copy, and the unit pool
        # (the prefill worker's) is mapped only to copy admitted requests' KV out of it.
        pool = kv.DECODE_POOL if s.mode == "disagg" else kv.UNIT_POOL
        description = await fetch_storage(bus, s.unit, self.instance, pool)
        self.compute = compute = await asyncio.to_thread(WorkerCompute.open, s, "decode")
        compute.attach_activity(s, description.region)
        await follow_splits(bus, compute, s, self.instance)
        self.host = await compute.run(host_model, description, s.sampler_seed)
        watchdog = watch_model_thread(compute, s.model_call_timeout_s)
        self._tasks.append(critical_task(watchdog, "model-watchdog"))
        if pool == kv.DECODE_POOL:
            unit_pool = await fetch_storage(bus, s.unit, self.instance)
            self.source = await compute.run(map_pool, unit_pool)
        source = self.source.pool if self.source is not None else None
        self.decoding = Decoding(bus, self.host, s, self.holder, compute, pool, source)
        await self.decoding.start()
        await follow_handover(bus, s, self.instance, self._hand_over)
        await serve_health(bus, SERVICE, self.instance, lambda: self.status)
        self.status = HealthStatus.READY
        await announce_ready(bus, s, self.instance)

    async def _hand_over(self) -> tuple[int, int]:
        """A replacement serves: it gets every resident request (unit_worker/handover.py)."""
        assert self.decoding is not None
        self.status = HealthStatus.DRAINING
        return await self.decoding.hand_over()

    async def ready(self) -> bool:
        healthy = self.decoding is not None and self.decoding.healthy()
        return healthy and all(not t.done() for t in self._tasks)

    async def drain(self) -> None:
        self.status = HealthStatus.DRAINING
        if self.decoding is not None:
            await self.decoding.drain()

    async def stop(self) -> None:
        if self.decoding is not None:
            await self.decoding.stop()
        await cancel_tasks(self._tasks)
        if self.host is not None:
            self.host.close()
        if self.source is not None:
            self.source.close()
        if self.compute is not None:
            self.compute.close()
        if self.bus is not None:
            await self.bus.close()
