"""The kv_manager service: the unit's storage (KV pool and weights), its block allocator and
leases, served over NATS.

Start: load the weights in the run dtype, pack them after the KV pool into one layout, open the
storage (CUDA IPC when usable, else /dev/shm, and say why), copy the weights in once, zero the
pool, drop the loaded copies; then serve `kv(unit, verb)` and sweep lapsed leases every
lease_s / 4.

Order: kv_manager is the unit's resident process. It starts first (workers wait for its
`storage` reply) and must stop LAST, after the unit's workers have exited: `stop` closes the
storage (on the CPU that unlinks the /dev/shm name; on CUDA, freeing memory another process
still has open is forbidden). `drain` keeps serving, so workers that drain before it can still
release their blocks.
"""

import asyncio
import contextlib
import gc
import logging

from duetserve.common.health import serve_health
from duetserve.common.nats_bus import Bus
from duetserve.proto import kv, subjects
from duetserve.proto.common import HealthStatus
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import kv_bytes_per_block
from duetserve.runtime.loader import parse_dtype
from duetserve.services.kv_manager.allocator import BlockAllocator
from duetserve.services.kv_manager.describe import describe
from duetserve.services.kv_manager.handlers import KVHandlers
from duetserve.services.kv_manager.settings import KVManagerSettings
from duetserve.services.kv_manager.storage import Storage, open_storage
from duetserve.services.kv_manager.unit_storage import (
    PoolGeometry,
    fill_storage,
    load_stored_weights,
    unit_layout,
)

logger = logging.getLogger(__name__)
SERVICE = "kv_manager"


class KVManagerService:
    def __init__(self, settings: KVManagerSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_name(SERVICE)
        self.status = HealthStatus.STARTING
        self.storage: Storage | None = None
        self.description: kv.StorageDescription | None = None
        self.allocator: BlockAllocator | None = None
        self.handlers: KVHandlers | None = None
        self.bus: Bus | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        self.description = await self._open_storage()
        self.allocator = BlockAllocator(self.description.num_blocks, s.lease_s)
        self.bus = bus = await Bus.connect(
            s.nats_url, self.instance, request_timeout_s=s.request_timeout_s
        )
        self.handlers = handlers = KVHandlers(
            bus, self.allocator, self.description, unit=s.unit, source=self.instance
        )
        served = {
            "alloc": handlers.alloc,
            "retain": handlers.retain,
            "release": handlers.release,
            "heartbeat": handlers.heartbeat,
            "storage": handlers.storage,
            "stats": handlers.stats,
            "shared": handlers.shared,
        }
        for verb, handler in served.items():
            await bus.subscribe(subjects.kv(s.unit, verb), handler)
        await serve_health(bus, SERVICE, self.instance, lambda: self.status)
        self._sweeper = asyncio.create_task(self._sweep_leases(handlers), name="kv-lease-sweep")
        await bus.flush()  # ready means the server knows the subscriptions
        self.status = HealthStatus.READY
        logger.info(
            "unit %s: %d KV blocks of %d tokens, leases of %gs",
            s.unit,
            self.description.num_blocks,
            s.block_size,
            s.lease_s,
        )

    async def _open_storage(self) -> kv.StorageDescription:
        """Create and fill the unit's storage; its description for workers."""
        s = self.settings
        dtype = parse_dtype(s.dtype)
        config = ModelConfig.from_dir(s.model)
        pool = PoolGeometry(
            s.pool_blocks(kv_bytes_per_block(config, s.block_size, dtype)), s.block_size, dtype
        )
        weights = await asyncio.to_thread(load_stored_weights, s.model, config, dtype)
        layout = unit_layout(config, weights, pool)
        opened = open_storage(layout, s.region_name(), s.storage, s.cuda_device)
        self.storage = opened.storage  # from here on, stop() closes it whatever happens
        # open_storage has logged which backend and why ("storage: ..."); this is the size.
        logger.info(
            "storage of %.1f MiB: the KV pool and %d weight tensors",
            layout.nbytes / 2**20,
            len(weights),
            extra={"nbytes": layout.nbytes, "kind": opened.storage.handle().KIND},
        )
        await asyncio.to_thread(fill_storage, opened.storage.tensors, weights)
        del weights  # the storage holds the one copy now
        gc.collect()
        return describe(
            opened.storage.handle(),
            block_size=pool.block_size,
            num_blocks=pool.num_blocks,
            model_dir=str(s.model.resolve()),
            dtype=s.dtype,
        )

    async def _sweep_leases(self, handlers: KVHandlers) -> None:
        period = self.settings.lease_s / 4
        while True:
            await asyncio.sleep(period)
            try:
                await handlers.sweep_leases()
            except Exception:  # a failed publish must not end the sweeping
                logger.exception("lease sweep failed")

    async def ready(self) -> bool:
        return (
            self.status == HealthStatus.READY
            and self._sweeper is not None
            and not self._sweeper.done()
        )

    async def drain(self) -> None:
        """Report draining but keep serving: the unit's workers stop first and may still
        release their blocks on the way out."""
        self.status = HealthStatus.DRAINING

    async def stop(self) -> None:
        """Stop sweeping, leave NATS, then close the storage (safe twice, and after a start
        that failed halfway)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.bus is not None:
            await self.bus.drain()
            self.bus = None
        if self.storage is not None:
            self.storage.close()
            self.storage = None
            logger.info("storage closed")
