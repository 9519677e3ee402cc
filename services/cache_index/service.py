"""The cache_index service: the exact-prefix radix index over one unit's KV blocks, served
over NATS (its unit's cache match, insert and evict subjects), and with DUET_SEMANTIC_CACHE
the semantic response cache (SEMANTIC_LOOKUP, SEMANTIC_INSERT; semantic_service.py).

Start: wait for the unit's kv_manager (its `storage` reply gives the block size), drop any
references a previous holder of the same name left behind, then serve and heart-beat so that
kv_manager keeps the index's references alive. Stop releases them.

Holder: every reference the index takes is held by one owner (no request part): the instance
name unless `settings.holder` says otherwise. kv_manager expires it like any other holder if
the heartbeats stop, and fences the name off; the index then forgets everything it named
(handlers.py) and carries on as a new holder, `<holder>.<n>`.
"""

import asyncio
import contextlib
import logging

from nats.aio.subscription import Subscription

from duetserve.common.health import serve_health
from duetserve.common.nats_bus import Bus
from duetserve.common.unit_client import Lease, LeaseLost, fetch_storage
from duetserve.proto import kv, subjects
from duetserve.proto.common import HealthStatus
from duetserve.proto.workers import worker_events_subject
from duetserve.services.cache_index.handlers import CacheHandlers
from duetserve.services.cache_index.kv_client import KVCallFailed, KVClient
from duetserve.services.cache_index.radix import RadixIndex
from duetserve.services.cache_index.semantic_service import SemanticService
from duetserve.services.cache_index.settings import CacheIndexSettings

logger = logging.getLogger(__name__)
SERVICE = "cache_index"


class CacheIndexService:
    def __init__(self, settings: CacheIndexSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_name(SERVICE)
        self.status = HealthStatus.STARTING
        self.bus: Bus | None = None
        self.kv: KVClient | None = None
        self.handlers: CacheHandlers | None = None
        self._subscriptions: list[Subscription] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self.holder = settings.holder or self.instance
        self.pools: tuple[str, ...] = (kv.UNIT_POOL,)  # with the host tier's, if the unit has one
        self.semantic: SemanticService | None = None  # DUET_SEMANTIC_CACHE

    async def start(self) -> None:
        s = self.settings
        self.bus = bus = await Bus.connect(
            s.nats_url,
            self.instance,
            request_timeout_s=s.request_timeout_s,
            access=s.nats_access(SERVICE),
        )
        block_size = (await fetch_storage(bus, s.unit, self.instance)).block_size
        self.kv = KVClient(bus, s.unit)
        pools = [kv.UNIT_POOL]
        host_radix, host_blocks = None, 0
        if s.host_kv_mb > 0:
            host_blocks = (await fetch_storage(bus, s.unit, self.instance, kv.HOST_POOL)).num_blocks
            host_radix = RadixIndex(block_size)
            pools.append(kv.HOST_POOL)
        self.pools = tuple(pools)
        await self._release_all("left by a previous holder of that name")
        self.handlers = handlers = CacheHandlers(
            bus,
            RadixIndex(block_size),
            self.kv,
            self.holder,
            host_radix=host_radix,
            host_limit=int(host_blocks * s.host_cache_share),
        )
        self._heartbeat = asyncio.create_task(self._keep_lease(), name="cache-lease")
        served = {
            subjects.cache(s.unit, "match"): handlers.match,
            subjects.cache(s.unit, "insert"): handlers.insert,
            subjects.cache(s.unit, "evict"): handlers.evict,
        }
        for subject, handler in served.items():
            self._subscriptions.append(await bus.subscribe(subject, handler, queue=SERVICE))
        self._subscriptions.append(
            await bus.subscribe(worker_events_subject(s.unit), handlers.worker_events)
        )
        if s.semantic_cache:
            self.semantic = semantic = SemanticService(bus, s.semantic_config())
            await semantic.start()
            for subject, handler in (
                (subjects.SEMANTIC_LOOKUP, semantic.lookup),
                (subjects.SEMANTIC_INSERT, semantic.insert),
            ):
                self._subscriptions.append(await bus.subscribe(subject, handler, queue=SERVICE))
        self._subscriptions.append(
            await serve_health(bus, SERVICE, self.instance, lambda: self.status)
        )
        await bus.flush()  # ready means the server knows the subscriptions
        self.status = HealthStatus.READY
        logger.info(
            "indexing unit %s in blocks of %d tokens as %s", s.unit, block_size, self.holder
        )

    async def _keep_lease(self) -> None:
        """Heart-beat as the index's holder; fenced off, start over as a new one, empty."""
        assert self.bus is not None and self.handlers is not None
        s = self.settings
        base = self.holder
        for incarnation in range(1, 2**31):
            leases = [
                Lease(self.bus, s.unit, self.holder, s.heartbeat_interval_s, pool)
                for pool in self.pools
            ]
            try:  # one lease per pool; either lost, the new holder starts empty in both
                async with asyncio.TaskGroup() as beats:
                    for lease in leases:
                        beats.create_task(lease.keep())
            except* LeaseLost as group:
                async with self.handlers.lock:
                    await self._release_all("of a holder fenced off")
                    self.handlers.forget_all(str(group.exceptions[0]))
                    self.handlers.forget_host(str(group.exceptions[0]))
                    self.holder = self.handlers.holder = f"{base}.{incarnation}"
                logger.warning("carrying on as %s", self.holder)

    async def _release_all(self, why: str) -> None:
        assert self.kv is not None
        for pool in self.pools:
            try:
                released = await self.kv.release(self.holder, pool=pool)
            except KVCallFailed as err:
                logger.warning("could not release the index's references (%s): %s", why, err)
                continue
            if released.num_freed:
                logger.info("released %d blocks %s", released.num_freed, why)

    async def ready(self) -> bool:
        beating = self._heartbeat is not None and not self._heartbeat.done()
        return self.status == HealthStatus.READY and beating

    async def drain(self) -> None:
        """Finish the message in hand; keep answering (a match of nothing is always safe)."""
        self.status = HealthStatus.DRAINING
        if self.handlers is not None:
            async with self.handlers.lock:
                pass

    async def stop(self) -> None:
        """Stop serving, give the index's references back, leave NATS. Safe twice."""
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions = []
        if self.handlers is not None and self.bus is not None and self.bus.is_connected:
            async with self.handlers.lock:  # after the message in hand, if any
                await self._release_all("at stop")
        if self.semantic is not None:
            await self.semantic.stop()
            self.semantic = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
