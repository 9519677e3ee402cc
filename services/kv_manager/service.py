"""The kv_manager service: the unit's storage (KV pool and weights), its block allocator and
leases, served over NATS. In disagg mode it serves two of each, the unit pool and the decode
worker's pool (`kv(unit, verb, "decode")`), each storage with its own copy of the weights.
With DUET_HOST_KV_MB, also the host tier (`kv(unit, verb, "host")`): KV blocks of the same
shape in a host memory region of their own, no weights, its own allocator and leases.

Start: load the weights in the run dtype, on the CPU re-lay the linear ones out for oneDNN
(runtime/layers/prepack.py: packed once here, read in place by every worker), pack them after
the KV pool into one layout, open the storage (CUDA IPC when usable, else /dev/shm, and say
why), copy the weights in once, zero the pool, drop the loaded copies; then serve
`kv(unit, verb)` and sweep lapsed leases every lease_s / 4.

Order: kv_manager is the unit's resident process. It starts first (workers wait for its
`storage` reply) and must stop LAST, after the unit's workers have exited: `stop` closes the
storage (on the CPU that unlinks the /dev/shm name; on CUDA, freeing memory another process
still has open is forbidden). `drain` keeps serving, so workers that drain before it can still
release their blocks; it stops the replacement workers it started (replacements.py) first.
"""

import asyncio
import contextlib
import gc
import logging
from dataclasses import dataclass

import torch
from nats.aio.msg import Msg

from duetserve.common.health import serve_health
from duetserve.common.lifecycle import cancel_tasks, critical_task
from duetserve.common.nats_bus import Bus
from duetserve.common.unit_role import UnitRole
from duetserve.proto import kv, subjects
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply, HealthStatus
from duetserve.proto.compute import ReplaceWorker, replace_worker_subject
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import kv_bytes_per_block
from duetserve.runtime.layers.prepack import pack_linear_weights, prepack_support
from duetserve.runtime.loader import parse_dtype
from duetserve.runtime.weights import Weights
from duetserve.services.kv_manager.allocator import BlockAllocator
from duetserve.services.kv_manager.cuda_ipc import probe_cuda
from duetserve.services.kv_manager.describe import describe
from duetserve.services.kv_manager.handlers import KVHandlers
from duetserve.services.kv_manager.poison import PoisonCheck
from duetserve.services.kv_manager.replacements import Replacements
from duetserve.services.kv_manager.settings import KVManagerSettings
from duetserve.services.kv_manager.storage import CpuSharedStorage, Storage, open_storage
from duetserve.services.kv_manager.unit_storage import (
    KV_POOL,
    PoolGeometry,
    fill_storage,
    host_layout,
    load_stored_weights,
    unit_layout,
)

logger = logging.getLogger(__name__)
SERVICE = "kv_manager"


@dataclass(slots=True)
class ServedPool:
    """One KV pool the unit serves: its storage (the pool and a copy of the weights), its
    allocator, and the handlers of `subjects.kv(unit, verb, name)`."""

    name: str  # kv.UNIT_POOL, kv.DECODE_POOL or kv.HOST_POOL
    storage: Storage
    description: kv.StorageDescription
    allocator: BlockAllocator
    handlers: KVHandlers | None = None


class KVManagerService:
    def __init__(self, settings: KVManagerSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_name(SERVICE)
        self.status = HealthStatus.STARTING
        self.pools: dict[str, ServedPool] = {}  # the unit pool first
        self.bus: Bus | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.role: UnitRole | None = None
        self._role_keeper: asyncio.Task[None] | None = None
        self.replacements = Replacements(settings.var_dir / "logs" if settings.var_dir else None)

    # The unit pool's parts (the only pool outside disagg mode).
    @property
    def storage(self) -> Storage | None:
        pool = self.pools.get(kv.UNIT_POOL)
        return pool.storage if pool is not None else None

    @property
    def description(self) -> kv.StorageDescription | None:
        pool = self.pools.get(kv.UNIT_POOL)
        return pool.description if pool is not None else None

    @property
    def allocator(self) -> BlockAllocator | None:
        pool = self.pools.get(kv.UNIT_POOL)
        return pool.allocator if pool is not None else None

    @property
    def handlers(self) -> KVHandlers | None:
        pool = self.pools.get(kv.UNIT_POOL)
        return pool.handlers if pool is not None else None

    async def start(self) -> None:
        s = self.settings
        await self._open_pools()
        self.bus = bus = await Bus.connect(
            s.nats_url,
            self.instance,
            request_timeout_s=s.request_timeout_s,
            access=s.nats_access(SERVICE),
        )
        # One kv_manager per unit: a second would hand out the same blocks again.
        self.role = UnitRole(bus, s.unit, SERVICE, self.instance)
        await self.role.claim(wait_s=self.role.ttl_s + 2)
        self._role_keeper = critical_task(self.role.keep(), "kv-manager-role")
        for pool in self.pools.values():
            poison = None
            if s.kv_poison:
                poison = PoisonCheck(pool.storage.tensors[KV_POOL])
                poison.poison(range(pool.description.num_blocks))
            pool.handlers = handlers = KVHandlers(
                bus,
                pool.allocator,
                pool.description,
                unit=s.unit,
                source=self.instance,
                pool=pool.name,
                poison=poison,
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
                await bus.subscribe(subjects.kv(s.unit, verb, pool.name), handler)
        await bus.subscribe(replace_worker_subject(s.unit), self._on_replace)
        await serve_health(bus, SERVICE, self.instance, lambda: self.status)
        self._sweeper = asyncio.create_task(self._sweep_leases(), name="kv-lease-sweep")
        await bus.flush()  # ready means the server knows the subscriptions
        self.status = HealthStatus.READY
        for pool in self.pools.values():
            logger.info(
                "unit %s%s: %d KV blocks of %d tokens, leases of %gs",
                s.unit,
                f" ({pool.name} pool)" if pool.name else "",
                pool.description.num_blocks,
                s.block_size,
                s.lease_s,
            )

    async def _open_pools(self) -> None:
        """The unit pool, and in disagg mode the decode worker's pool beside it: each its own
        storage with its own copy of the weights, its own allocator."""
        s = self.settings
        dtype = parse_dtype(s.dtype)
        config = ModelConfig.from_dir(s.model)
        total = s.pool_blocks(kv_bytes_per_block(config, s.block_size, dtype))
        if s.mode == "disagg":
            unit_blocks, decode_blocks = s.split_blocks(total)
            plan = [
                (kv.UNIT_POOL, unit_blocks, s.region_name()),
                (kv.DECODE_POOL, decode_blocks, f"{s.region_name()}-{kv.DECODE_POOL}"),
            ]
        else:
            plan = [(kv.UNIT_POOL, total, s.region_name())]
        weights = await asyncio.to_thread(load_stored_weights, s.model, config, dtype)
        weights = await asyncio.to_thread(self._packed_for_cpu, config, weights, dtype)
        for name, num_blocks, region in plan:
            pool = PoolGeometry(num_blocks, s.block_size, dtype)
            storage, description = await self._open_storage(config, weights, pool, region)
            allocator = BlockAllocator(description.num_blocks, s.lease_s)
            self.pools[name] = ServedPool(name, storage, description, allocator)
        del weights  # the storages hold the copies now
        gc.collect()
        host_blocks = s.host_blocks(kv_bytes_per_block(config, s.block_size, dtype))
        if host_blocks > 0:
            pool = PoolGeometry(host_blocks, s.block_size, dtype)
            region = f"{s.region_name()}-{kv.HOST_POOL}"
            storage, description = await self._open_host_storage(config, pool, region)
            allocator = BlockAllocator(description.num_blocks, s.lease_s)
            self.pools[kv.HOST_POOL] = ServedPool(kv.HOST_POOL, storage, description, allocator)
        elif s.host_kv_mb > 0:
            raise ValueError(f"host_kv_mb={s.host_kv_mb:g} holds no KV block")

    async def _open_host_storage(
        self, config: ModelConfig, pool: PoolGeometry, region: str
    ) -> tuple[Storage, kv.StorageDescription]:
        """The host tier: always host memory (/dev/shm), zeroed. On a GPU the workers copy to
        and from it through their mappings, which they register as pinned memory (DMA copies
        on a stream of their own, overlapped with the model's kernels: PinnedHostMemory)."""
        storage = CpuSharedStorage.create(region, host_layout(config, pool))
        await asyncio.to_thread(storage.tensors[KV_POOL].zero_)
        logger.info("host tier of %.1f MiB in /dev/shm/%s", storage.layout.nbytes / 2**20, region)
        return storage, self._describe(storage, pool)

    def _describe(self, storage: Storage, pool: PoolGeometry) -> kv.StorageDescription:
        """What workers need to map `storage` and to know what is in it."""
        s = self.settings
        return describe(
            storage.handle(),
            block_size=pool.block_size,
            num_blocks=pool.num_blocks,
            model_dir=str(s.model.resolve()),
            dtype=s.dtype,
        )

    def _packed_for_cpu(self, config: ModelConfig, weights: Weights, dtype: torch.dtype) -> Weights:
        """The weights with their linear ones packed for oneDNN, when workers will run them on
        this CPU and this torch can; else as they are, saying why."""
        s = self.settings
        if not s.prepack_weights:
            logger.info("weights: plain layout (DUET_PREPACK_WEIGHTS=false)")
            return weights
        if s.storage == "cuda" or (s.storage == "auto" and probe_cuda().available):
            return weights
        support = prepack_support(dtype)
        if not support.available:
            logger.info("weights: plain layout (%s)", support.reason)
            return weights
        logger.info("weights: linear layers in %s", support.reason)
        return pack_linear_weights(weights, config)

    async def _open_storage(
        self, config: ModelConfig, weights: Weights, pool: PoolGeometry, region: str
    ) -> tuple[Storage, kv.StorageDescription]:
        """Create one storage and copy the weights into it; it and its description for
        workers."""
        s = self.settings
        layout = unit_layout(config, weights, pool)
        opened = open_storage(layout, region, s.storage, s.cuda_device)
        storage = opened.storage
        try:
            # open_storage has logged which backend and why ("storage: ..."); this is the size.
            logger.info(
                "storage of %.1f MiB: the KV pool and %d weight tensors",
                layout.nbytes / 2**20,
                len(weights),
                extra={"nbytes": layout.nbytes, "kind": storage.handle().KIND},
            )
            await asyncio.to_thread(fill_storage, storage.tensors, weights)
        except BaseException:
            storage.close()
            raise
        return storage, self._describe(storage, pool)

    async def _on_replace(self, msg: Msg) -> None:
        """Start a replacement worker (see proto/compute.py); the reply names its pid."""
        assert self.bus is not None
        answer: object
        try:
            request = decode(msg.data, ReplaceWorker)
            if self.status != HealthStatus.READY:
                answer = ErrorReply("draining", "kv_manager is not serving: no replacement")
            else:
                answer = self.replacements.start(request)
        except ProtoError as err:
            answer = ErrorReply(err.code, str(err))
        except OSError as err:
            logger.exception("could not start a replacement worker")
            answer = ErrorReply("spawn_failed", f"{type(err).__name__}: {err}")
        if msg.reply:
            await self.bus.reply(msg, encode(answer))

    async def _sweep_leases(self) -> None:
        """Every lease_s / 4, release the holders whose lease lapsed. Only while connected to
        NATS: cut off, kv_manager hears no heartbeat from anyone, and expiring every holder at
        once would free blocks their workers still write. Back on the bus, every holder gets
        a full lease from then to beat again."""
        assert self.bus is not None
        period = self.settings.lease_s / 4
        seen = self.bus.reconnects
        while True:
            await asyncio.sleep(period)
            if not self.bus.is_connected:
                continue
            if self.bus.reconnects != seen:
                seen = self.bus.reconnects
                logger.warning("back on NATS: every lease runs a full %gs from now", period * 4)
                for pool in self.pools.values():
                    assert pool.handlers is not None
                    pool.allocator.extend_all(pool.handlers.clock())
            for pool in self.pools.values():
                assert pool.handlers is not None
                try:
                    await pool.handlers.sweep_leases()
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
        await self.replacements.stop_all()

    async def stop(self) -> None:
        """Stop sweeping, leave NATS, then close the storage (safe twice, and after a start
        that failed halfway)."""
        await self.replacements.stop_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._role_keeper is not None:
            await cancel_tasks([self._role_keeper])
            self._role_keeper = None
        if self.role is not None:
            await self.role.release()
            self.role = None
        if self.bus is not None:
            await self.bus.drain()
            self.bus = None
        for pool in self.pools.values():
            pool.storage.close()
            logger.info("storage closed%s", f" ({pool.name} pool)" if pool.name else "")
        self.pools = {}
