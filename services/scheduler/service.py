"""The scheduler service: wiring and lifecycle around SchedulerCore and its handlers."""

import asyncio
import logging

from duetserve.common.health import serve_health
from duetserve.common.lifecycle import cancel_tasks, critical_task
from duetserve.common.nats_bus import Bus
from duetserve.common.token_outbox import TokenOutbox
from duetserve.common.unit_client import Lease, fetch_storage
from duetserve.common.unit_role import UnitRole
from duetserve.proto import kv, subjects, workers
from duetserve.proto.common import HealthStatus
from duetserve.services.scheduler.admission import AdmissionControl
from duetserve.services.scheduler.card import publish_cards
from duetserve.services.scheduler.core import SchedulerCore, SpanReuse
from duetserve.services.scheduler.handlers import SchedulerHandlers
from duetserve.services.scheduler.planner import Planner, PlannerConfig
from duetserve.services.scheduler.policy import make_policy
from duetserve.services.scheduler.settings import SchedulerSettings
from duetserve.services.scheduler.split_controller import SplitController, SplitControllerConfig
from duetserve.services.scheduler.split_tuner import SplitTuner

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
        self.tuner: SplitTuner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.role: UnitRole | None = None

    async def start(self) -> None:
        s = self.settings
        self.bus = bus = await Bus.connect(
            s.nats_url,
            self.instance,
            request_timeout_s=s.request_timeout_s,
            access=s.nats_access(SERVICE),
        )
        # One scheduler per unit: a second would admit the same requests again.
        self.role = UnitRole(bus, s.unit, SERVICE, self.instance)
        await self.role.claim(wait_s=self.role.ttl_s + 2)
        storage = await fetch_storage(bus, s.unit, self.instance)
        decode_pool_blocks = None
        if s.mode == "disagg":
            decode_pool = await fetch_storage(bus, s.unit, self.instance, kv.DECODE_POOL)
            decode_pool_blocks = decode_pool.num_blocks
        config = PlannerConfig(
            block_size=storage.block_size,
            max_prefill_tokens=s.max_prefill_tokens,
            max_prefill_seqs=s.max_prefill_seqs,
            prefill_order=s.prefill_order,
            prefill_max_wait_s=s.prefill_max_wait_s,
            max_running=s.max_running,
            decode_reserve_blocks=s.decode_reserve_blocks,
        )
        policy = make_policy(
            s.policy, s.fairness, config.block_size, s.jitserve_group, s.hit_rate_order
        )
        planner = Planner(config, policy)
        outbox = TokenOutbox(bus, self.instance)
        await outbox.start()
        self.tuner = tuner = SplitTuner(bus, s.unit, split_controller(s), s.prefill_share)
        await tuner.start()
        self.core = SchedulerCore(
            bus,
            planner,
            s.unit,
            storage.num_blocks,
            s.prefill_timeout_s,
            tuner,
            outbox,
            shared_steps=s.mode == "unified",
            decode_pool_blocks=decode_pool_blocks,
            admission=AdmissionControl(
                max_waiting=s.max_waiting,
                max_running=s.max_running,
                factor=s.admission_factor,
                slo_aware=s.admission == "slo",
            ),
        )
        bus.on_reconnected(self.core.connection_restored)
        self.handlers = handlers = SchedulerHandlers(bus, self.core, s.unit, self.instance)
        await bus.subscribe(subjects.sched(s.unit, "submit"), handlers.on_submit)
        await bus.subscribe(subjects.sched(s.unit, "cancel"), handlers.on_cancel)
        await bus.subscribe(subjects.sched(s.unit, "stats"), handlers.on_stats)
        await bus.subscribe(subjects.sched(s.unit, "status"), handlers.on_status)
        await bus.subscribe(subjects.sched(s.unit, "resume"), handlers.on_resume)
        await bus.subscribe(workers.worker_events_subject(s.unit), handlers.on_worker_events)
        self._tasks = [
            critical_task(self.core.run(), "scheduler-loop"),
            critical_task(tuner.run(), "split-controller"),
            # Fenced off (its lease lapsed: a scheduler frozen too long), the blocks it held
            # are gone: it stops, and its supervisor starts a new one, a new holder.
            critical_task(
                Lease(bus, s.unit, self.instance, s.heartbeat_interval_s).keep(),
                "scheduler-lease",
            ),
            critical_task(self.role.keep(), "scheduler-role"),
            # The unit's card in the registry: alive, and how busy (ingress routes by it).
            critical_task(
                publish_cards(bus, self.core, s.unit, self.instance, summary=handlers.prefixes),
                "unit-card",
            ),
        ]
        if s.host_kv_mb > 0 and s.mode != "disagg":
            # Swapped-out KV waits in the host tier under the scheduler's owners (policy and
            # memory preemptions swap when that is cheaper than recomputing: core.swap_owners).
            self.core.host_tier = True
            host_lease = Lease(bus, s.unit, self.instance, s.heartbeat_interval_s, kv.HOST_POOL)
            self._tasks.append(critical_task(host_lease.keep(), "scheduler-host-lease"))
        if s.span_reuse:
            # The pool's tensor is [layers, 2, blocks, block size, kv heads, head dim].
            layers = next((t.shape[0] for t in storage.tensors if t.name == "kv_pool"), None)
            if layers is not None and s.span_check_layer >= layers:
                raise ValueError(
                    f"DUET_SPAN_CHECK_LAYER={s.span_check_layer}: the model has {layers} layers"
                )
            self.core.span_reuse = SpanReuse(s.span_recompute, s.span_check_layer, layers or 1)
        self.core.peek_hits = s.hit_rate_order
        await serve_health(bus, SERVICE, self.instance, lambda: self.status)
        self.status = HealthStatus.READY
        logger.info(
            "scheduling unit %s (%s): %d blocks of %d tokens%s, policy %s",
            s.unit,
            s.mode,
            storage.num_blocks,
            storage.block_size,
            f" (decode pool: {decode_pool_blocks})" if decode_pool_blocks is not None else "",
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
        if self.role is not None:
            await self.role.release()
        if self.bus is not None:
            await self.bus.close()


def split_controller(s: SchedulerSettings) -> SplitController | None:
    """The partition controller the settings ask for (None: the split stays where it starts)."""
    if s.split_control == "static" or s.mode != "semi-pd":
        return None
    config = SplitControllerConfig(
        # Samples are latencies over each request's own target (split_tuner.py): 1.0 is every
        # request's SLO, whatever it is.
        ttft_slo_s=1.0,
        tpot_slo_s=1.0,
        percentile=s.split_percentile,
        window_samples=s.split_window_samples,
        window_s=s.split_window_s,
        min_samples=min(s.split_min_samples, s.split_window_samples),
        step=s.split_step,
        min_share=s.split_min_share,
        max_share=s.split_max_share,
        initial_split=min(max(s.prefill_share, s.split_min_share), s.split_max_share),
        recover_block_windows=s.split_recover_block_windows,
    )
    return SplitController(config, start=asyncio.get_running_loop().time())
