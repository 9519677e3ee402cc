"""The scheduler service: wiring and lifecycle around SchedulerCore and its handlers."""

import asyncio
import logging

from duetserve.common.health import serve_health
from duetserve.common.lifecycle import cancel_tasks, critical_task
from duetserve.common.nats_bus import Bus
from duetserve.common.unit_client import fetch_storage, heartbeat_forever
from duetserve.proto import subjects, workers
from duetserve.proto.common import HealthStatus
from duetserve.services.scheduler.core import SchedulerCore
from duetserve.services.scheduler.handlers import SchedulerHandlers
from duetserve.services.scheduler.planner import Planner, PlannerConfig
from duetserve.services.scheduler.policy.fcfs import FcfsPolicy
from duetserve.services.scheduler.requests import SCHEDULER_HOLDER
from duetserve.services.scheduler.settings import SchedulerSettings

logger = logging.getLogger(__name__)
SERVICE = "scheduler"


class SchedulerService:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_name(SERVICE)
        self.bus: Bus | None = None
        self.status = HealthStatus.STARTING
        self.core: SchedulerCore | None = None
        self.handlers: SchedulerHandlers | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        s = self.settings
        self.bus = bus = await Bus.connect(
            s.nats_url, self.instance, request_timeout_s=s.request_timeout_s
        )
        storage = await fetch_storage(bus, s.unit, self.instance)
        config = PlannerConfig(
            block_size=storage.block_size,
            max_prefill_tokens=s.max_prefill_tokens,
            max_prefill_seqs=s.max_prefill_seqs,
            max_running=s.max_running,
            decode_reserve_blocks=s.decode_reserve_blocks,
        )
        planner = Planner(config, FcfsPolicy())
        self.core = SchedulerCore(bus, planner, s.unit, storage.num_blocks, s.prefill_timeout_s)
        self.handlers = handlers = SchedulerHandlers(bus, self.core, s.unit)
        await bus.subscribe(subjects.SCHED_SUBMIT, handlers.on_submit)
        await bus.subscribe(subjects.SCHED_CANCEL, handlers.on_cancel)
        await bus.subscribe(subjects.SCHED_STATS, handlers.on_stats)
        await bus.subscribe(workers.worker_events_subject(s.unit), handlers.on_worker_events)
        self._tasks = [
            critical_task(self.core.run(), "scheduler-loop"),
            critical_task(
                heartbeat_forever(bus, s.unit, SCHEDULER_HOLDER, s.heartbeat_interval_s),
                "scheduler-heartbeat",
            ),
        ]
        await serve_health(bus, SERVICE, self.instance, lambda: self.status)
        self.status = HealthStatus.READY
        logger.info(
            "scheduling unit %s: %d blocks of %d tokens, policy %s",
            s.unit,
            storage.num_blocks,
            storage.block_size,
            planner.policy.name,
        )

    async def ready(self) -> bool:
        return self.core is not None and all(not t.done() for t in self._tasks)

    async def drain(self) -> None:
        """Refuse new requests; let the accepted ones finish."""
        self.status = HealthStatus.DRAINING
        if self.handlers is not None:
            self.handlers.accepting = False
        while self.core is not None and self.core.records:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        if self.bus is not None:
            await self.bus.close()
