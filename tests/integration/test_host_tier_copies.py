"""The decode worker's copies to and from the host tier, against a real kv_manager: a swap-out
copies only the blocks the request's host copy does not hold yet (DecodeItem.host_kept), bit
for bit; a KV load fills a request's blocks from the host tier only while the owner it names
holds them. The worker runs in the test's process; kv_manager's two pools are read in place."""

from types import SimpleNamespace
from typing import Any, cast

import torch

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.common.token_outbox import TokenOutbox
from duetserve.proto import kv, subjects, workers
from duetserve.proto.common import ErrorReply
from duetserve.proto.scheduling import Sampling
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import KVPool, kv_bytes_per_block
from duetserve.services.decode_worker.settings import DecodeSettings
from duetserve.services.unit_worker.stepper import DecodeStepper
from tests.conftest import ModelDirs
from tests.integration.unit_services import ask_ok, running_kv_manager
from tests.model_specs import TINY

OWNER = "scheduler/r-1"


async def test_swap_out_skips_the_host_copy_and_a_load_writes_only_for_its_owner(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    tiny = model_dirs.get(TINY)
    config = ModelConfig.from_dir(tiny)
    per_block = kv_bytes_per_block(config, 16, torch.float32)
    async with running_kv_manager(
        nats_server.url, tiny, num_blocks=16, host_kv_mb=8 * per_block / 2**20, dtype="float32"
    ) as service:
        unit = service.settings.unit
        device = KVPool(service.pools[kv.UNIT_POOL].storage.tensors["kv_pool"])
        host = KVPool(service.pools[kv.HOST_POOL].storage.tensors["kv_pool"])
        stepper = DecodeStepper(
            bus,
            cast(Any, SimpleNamespace(config=config, pool=device)),
            DecodeSettings(nats_url=nats_server.url, unit=unit),
            "decode-1",
            cast(Any, None),
            TokenOutbox(bus, "decode-1"),
        )
        stepper.host_tier = host
        try:
            await _swap_and_load(bus, unit, stepper, device, host)
        finally:
            await stepper.finish_swaps()


async def _swap_and_load(
    bus: Bus, unit: str, stepper: DecodeStepper, device: KVPool, host: KVPool
) -> None:
    def alloc(owner: str, count: int, pool: str = kv.UNIT_POOL) -> Any:
        subject = subjects.kv(unit, "alloc", pool)
        return ask_ok(bus, subject, kv.AllocateBlocks(owner, count), kv.BlocksGranted)

    # A request of 40 computed tokens in three blocks, whose first block the host tier holds
    # already (its host copy, under the scheduler's owner).
    table = (await alloc(OWNER, 3)).block_ids
    generator = torch.Generator().manual_seed(7)
    for block in table:
        noise = torch.randn(device.tensor[:, :, block].shape, generator=generator)
        device.tensor[:, :, block] = noise.to(device.tensor.dtype)
    [kept] = (await alloc(OWNER, 1, kv.HOST_POOL)).block_ids
    host.tensor[:, :, kept] = device.tensor[:, :, table[0]]
    state = workers.SamplingState(tuple(range(40)), (9,), Sampling(8), "stream-1")
    item = workers.DecodeItem("r-1", table, state, owner=OWNER, host_kept=1)
    admitted = await stepper.admit((item,))
    assert admitted.request_ids == ("r-1",)

    resident = stepper.residents.pop("r-1")
    event = await stepper._swap_out(resident, OWNER)
    await stepper._release(resident)  # as a preemption by swap does once the copy is done
    assert event is not None and event.host_kept == 1
    copied = event.host_block_ids
    assert len(copied) == 2 and kept not in copied  # blocks 1 and 2 only
    for source, target in zip(table[1:], copied, strict=True):
        assert torch.equal(host.tensor[:, :, target], device.tensor[:, :, source])
    host_stats = subjects.kv(unit, "stats", kv.HOST_POOL)
    held = await ask_ok(bus, host_stats, kv.KvStatsQuery(), kv.KvStats)
    assert held.references_by_holder == {"scheduler": 3}

    # Loaded back into another request's blocks: exactly the host blocks' KV.
    targets = (await alloc("scheduler/r-2", 3)).block_ids
    host_ids = (kept, *copied)
    loaded = await stepper.load(workers.KvLoad("scheduler/r-2", host_ids, targets))
    assert isinstance(loaded, workers.KvLoaded) and loaded.blocks == 3
    for source, target in zip(table, targets, strict=True):
        assert torch.equal(device.tensor[:, :, target], device.tensor[:, :, source])

    # A load for an owner that does not hold the blocks (one that gave up on them) writes
    # nothing, and the worker keeps none of them.
    before = device.tensor[:, :, list(targets)].clone()
    refused = await stepper.load(workers.KvLoad("scheduler/r-9", host_ids[:1], targets[:1]))
    assert isinstance(refused, ErrorReply)
    assert torch.equal(device.tensor[:, :, list(targets)], before)
    stats = await ask_ok(bus, subjects.kv(unit, "stats"), kv.KvStatsQuery(), kv.KvStats)
    assert "decode-1" not in stats.references_by_holder, stats.references_by_holder
