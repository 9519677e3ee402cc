"""kv_manager over a real nats-server: the storage it describes maps in another process, block
round trips and refusals, lease expiry with its event, and malformed requests."""

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import kv, subjects
from duetserve.proto.codec import decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.workers import EventKind, WorkerEvents, worker_events_subject
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import kv_bytes_per_block
from duetserve.runtime.layers.prepack import unpack_linear_weights
from duetserve.runtime.weights import load_weights
from duetserve.services.kv_manager.settings import KVManagerSettings
from tests.conftest import ModelDirs
from tests.integration.unit_services import (
    ServiceProcess,
    ask,
    ask_ok,
    new_unit,
    num_free,
    running_kv_manager,
    wait_for_reply,
)
from tests.model_specs import TINY, TINY_QWEN2

# Runs in a separate process: maps the described storage and checks every weight against the
# checkpoint loaded directly (the linear ones stored oneDNN-packed: read back in place, then
# compared), then writes into the KV pool for the parent to see.
MAPPER = """
import sys
import torch
from duetserve.proto import kv
from duetserve.proto.codec import decode
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import kv_bytes_per_block
from duetserve.runtime.loader import parse_dtype
from duetserve.runtime.layers.prepack import PACKED, unpack_linear_weights
from duetserve.runtime.weights import load_weights
from duetserve.services.kv_manager.settings import KVManagerSettings
from duetserve.services.kv_manager.describe import handle_of
from duetserve.services.kv_manager.storage import attach_storage

description = decode(sys.stdin.buffer.read(), kv.StorageDescription)
mapped = attach_storage(handle_of(description))
config = ModelConfig.from_dir(description.model_dir)
expected = load_weights(description.model_dir, config, parse_dtype(description.dtype))
assert "layers.0.qkv_proj" + PACKED in mapped.tensors
assert "layers.0.qkv_proj" not in mapped.tensors  # packed instead, not beside
weights = unpack_linear_weights(mapped.tensors, config)
for name, tensor in expected.items():
    stored = weights[name]
    assert torch.equal(stored.to_dense() if stored.is_mkldnn else stored, tensor), name
pool = mapped.tensors["kv_pool"]
assert pool.shape[2] == description.num_blocks and not pool.any()
pool[1, 0, 2].fill_(7.0)
print("checked", len(expected), "weights")
"""


@pytest.fixture
def tiny(model_dirs: ModelDirs) -> Path:
    return model_dirs.get(TINY)


async def test_storage_maps_in_another_process(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    async with running_kv_manager(nats_server.url, tiny) as service:
        unit = service.settings.unit
        description = await ask_ok(
            bus, subjects.kv(unit, "storage"), kv.StorageQuery("test"), kv.StorageDescription
        )
        assert description.kind == kv.StorageKind.CPU_SHARED_MEMORY
        assert (description.num_blocks, description.block_size) == (8, 16)
        assert description.tensors[0].name == "kv_pool"
        mapper = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", MAPPER],
            input=encode(description),
            capture_output=True,
            timeout=60,
        )
        assert mapper.returncode == 0, mapper.stderr.decode()
        assert b"checked" in mapper.stdout
        assert service.storage is not None
        pool = service.storage.tensors["kv_pool"]
        assert torch.all(pool[1, 0, 2] == 7.0)  # the other process wrote the same memory
        assert float(pool.sum()) == 7.0 * pool[1, 0, 2].numel()


async def test_a_tied_head_is_stored_once(nats_server: NatsServer, model_dirs: ModelDirs) -> None:
    tied = model_dirs.get(TINY_QWEN2)
    async with running_kv_manager(nats_server.url, tied, dtype="bfloat16") as service:
        assert service.storage is not None and service.description is not None
        tensors = service.storage.tensors
        names = [spec.name for spec in service.description.tensors]
        assert "lm_head" not in names and "embed_tokens" in names
        assert "layers.0.qkv_bias" in names
        plain = {n: t for n, t in tensors.items() if ":onednn" not in n}
        assert all(t.dtype == torch.bfloat16 for t in plain.values())
        config = ModelConfig.from_dir(tied)
        expected = load_weights(tied, config, torch.bfloat16)["lm_head"]
        assert torch.equal(tensors["embed_tokens"], expected)
        # The head is also kept packed for its matmul (the table itself serves gathers).
        head = unpack_linear_weights(tensors, config)["lm_head"]
        assert head.is_mkldnn and torch.equal(head.to_dense(), expected)


async def test_auto_storage_falls_back_to_cpu_with_a_reason(
    nats_server: NatsServer,
    tiny: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        async with running_kv_manager(nats_server.url, tiny, storage="auto") as service:
            assert service.description is not None
            kind = service.description.kind
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("storage: ")]
    assert lines, caplog.text
    if kind == kv.StorageKind.CPU_SHARED_MEMORY:
        assert "using CPU shared memory" in lines[-1]
    assert "storage closed" in caplog.text


async def test_alloc_retain_release_round_trips(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    async with running_kv_manager(nats_server.url, tiny) as service:
        unit = service.settings.unit
        alloc, retain, release = (subjects.kv(unit, v) for v in ("alloc", "retain", "release"))
        granted = await ask_ok(bus, alloc, kv.AllocateBlocks("sched/r1", 3), kv.BlocksGranted)
        assert granted.owner == "sched/r1" and len(set(granted.block_ids)) == 3
        assert granted.num_free == 5
        shared = granted.block_ids[:2]
        retained = await ask_ok(bus, retain, kv.RetainBlocks("decode/r1", shared), kv.BlocksGranted)
        assert retained.block_ids == shared and retained.num_free == 5

        refused = await ask(bus, alloc, kv.AllocateBlocks("sched/r2", 6), kv.BlocksGranted)
        assert isinstance(refused, ErrorReply) and refused.code == "out_of_blocks"
        assert "6 blocks" in refused.message and "5 of 8" in refused.message

        # Releasing all of an owner's blocks: the shared ones stay for decode/r1.
        released = await ask_ok(bus, release, kv.ReleaseBlocks("sched/r1"), kv.BlocksReleased)
        assert (released.num_freed, released.num_free) == (1, 6)
        one = await ask_ok(
            bus, release, kv.ReleaseBlocks("decode/r1", shared[:1]), kv.BlocksReleased
        )
        assert (one.num_freed, one.num_free) == (1, 7)
        again = await ask(
            bus, release, kv.ReleaseBlocks("decode/r1", shared[:1]), kv.BlocksReleased
        )
        assert isinstance(again, ErrorReply) and again.code == "not_held"
        unknown = await ask(bus, retain, kv.RetainBlocks("x/r", (shared[0],)), kv.BlocksGranted)
        assert isinstance(unknown, ErrorReply) and unknown.code == "unknown_block"
        await ask_ok(bus, release, kv.ReleaseBlocks("decode/r1"), kv.BlocksReleased)
        assert await num_free(bus, unit) == 8


async def test_a_silent_holder_loses_its_blocks(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    async with running_kv_manager(nats_server.url, tiny, lease_s=0.3) as service:
        unit = service.settings.unit
        events: asyncio.Queue[WorkerEvents] = asyncio.Queue()

        async def on_events(msg: Msg) -> None:
            events.put_nowait(decode(msg.data, WorkerEvents))

        await bus.subscribe(worker_events_subject(unit), on_events)
        await bus.flush()
        beating = asyncio.create_task(_beat(bus, unit, "live", every_s=0.05))
        try:
            alloc = subjects.kv(unit, "alloc")
            kept = await ask_ok(bus, alloc, kv.AllocateBlocks("live/r1", 2), kv.BlocksGranted)
            await ask_ok(bus, alloc, kv.AllocateBlocks("dead/r2", 3), kv.BlocksGranted)
            report = await asyncio.wait_for(events.get(), timeout=3.0)
            await asyncio.sleep(0.6)  # two more lease periods: the live holder keeps its blocks
        finally:
            beating.cancel()
        assert report.source == service.instance
        assert [(e.kind, e.request_id) for e in report.events] == [(EventKind.LEASES_EXPIRED, "r2")]
        assert "dead" in report.events[0].reason and report.free_blocks == 6
        assert events.empty()
        released = await ask_ok(
            bus, subjects.kv(unit, "release"), kv.ReleaseBlocks("live/r1"), kv.BlocksReleased
        )
        assert (released.num_freed, released.num_free) == (len(kept.block_ids), 8)


async def test_disagg_serves_two_pools_with_their_own_weights_and_allocators(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    async with running_kv_manager(
        nats_server.url, tiny, mode="disagg", num_blocks=8, decode_pool_share=0.75, lease_s=0.3
    ) as service:
        unit = service.settings.unit
        query = kv.StorageQuery("test")
        unit_pool, decode_pool = [
            await ask_ok(bus, subjects.kv(unit, "storage", pool), query, kv.StorageDescription)
            for pool in (kv.UNIT_POOL, kv.DECODE_POOL)
        ]
        assert (unit_pool.num_blocks, decode_pool.num_blocks) == (2, 6)  # the unit's 8
        assert unit_pool.region != decode_pool.region
        # two copies of the weights: equal values in two different storages
        ours, decode_own = (service.pools[p].storage.tensors for p in (kv.UNIT_POOL, "decode"))
        for name in ("embed_tokens", "layers.0.qkv_proj:onednn"):
            assert torch.equal(ours[name], decode_own[name])
            assert ours[name].data_ptr() != decode_own[name].data_ptr()
        # two allocators: filling the decode pool leaves the unit pool alone
        decode_alloc = subjects.kv(unit, "alloc", kv.DECODE_POOL)
        full = await ask_ok(bus, decode_alloc, kv.AllocateBlocks("w/r1", 6), kv.BlocksGranted)
        assert full.num_free == 0 and await num_free(bus, unit) == 2
        refused = await ask(bus, decode_alloc, kv.AllocateBlocks("w/r2", 1), kv.BlocksGranted)
        assert isinstance(refused, ErrorReply) and refused.code == "out_of_blocks"
        # a holder that stops beating on the decode pool loses its blocks there, and the
        # report says which pool its free count is of
        report = await next_report(bus, unit)
        assert report.kv_pool == kv.DECODE_POOL and report.free_blocks == 6
        assert [(e.kind, e.request_id) for e in report.events] == [(EventKind.LEASES_EXPIRED, "r1")]


async def test_the_host_tier_is_a_pool_of_its_own_with_leases(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    config = ModelConfig.from_dir(tiny)
    per_block = kv_bytes_per_block(config, 16, torch.float32)
    megabytes = 12 * per_block / 2**20  # room for 12 blocks
    async with running_kv_manager(
        nats_server.url, tiny, num_blocks=8, host_kv_mb=megabytes, lease_s=0.3
    ) as service:
        unit = service.settings.unit
        query = kv.StorageQuery("test")
        device, host = [
            await ask_ok(bus, subjects.kv(unit, "storage", pool), query, kv.StorageDescription)
            for pool in (kv.UNIT_POOL, kv.HOST_POOL)
        ]
        assert (device.num_blocks, host.num_blocks) == (8, 12)
        assert host.region != device.region and [t.name for t in host.tensors] == ["kv_pool"]
        pools = {p: service.pools[p].storage.tensors["kv_pool"] for p in (kv.UNIT_POOL, "host")}
        assert pools["host"].shape[2] == 12 and pools["host"].shape[3:] == pools[""].shape[3:]
        assert not pools["host"].any()
        # Its own allocator: filling it leaves the device pool alone.
        alloc = subjects.kv(unit, "alloc", kv.HOST_POOL)
        full = await ask_ok(bus, alloc, kv.AllocateBlocks("w/r1", 12), kv.BlocksGranted)
        assert full.block_ids == tuple(range(12)) and full.num_free == 0
        assert await num_free(bus, unit) == 8
        # Leased like the device pool: a holder that stops beating loses them, and says so.
        report = await next_report(bus, unit)
        assert report.kv_pool == kv.HOST_POOL and report.free_blocks == 12
        assert [(e.kind, e.request_id) for e in report.events] == [(EventKind.LEASES_EXPIRED, "r1")]


async def next_report(bus: Bus, unit: str, timeout_s: float = 3.0) -> WorkerEvents:
    """The next WorkerEvents the unit's kv_manager publishes (a lease sweep's report)."""
    events: asyncio.Queue[WorkerEvents] = asyncio.Queue()

    async def on_events(msg: Msg) -> None:
        events.put_nowait(decode(msg.data, WorkerEvents))

    subscription = await bus.subscribe(worker_events_subject(unit), on_events)
    try:
        return await asyncio.wait_for(events.get(), timeout=timeout_s)
    finally:
        await subscription.unsubscribe()


def test_disagg_needs_blocks_for_two_pools() -> None:
    settings = KVManagerSettings(model=Path("m"), mode="disagg", decode_pool_share=0.99)
    assert settings.split_blocks(10) == (1, 9)
    assert settings.split_blocks(2) == (1, 1)
    with pytest.raises(ValueError, match="two KV pools"):
        settings.split_blocks(1)


async def test_a_lapsed_lease_is_refused_until_renewed(
    nats_server: NatsServer,
    bus: Bus,
    tiny: Path,
) -> None:
    async with running_kv_manager(nats_server.url, tiny, lease_s=60.0) as service:
        unit, handlers = service.settings.unit, service.handlers
        assert handlers is not None
        alloc = subjects.kv(unit, "alloc")
        await ask_ok(bus, alloc, kv.AllocateBlocks("w/r1", 1), kv.BlocksGranted)
        handlers.clock = lambda: time.monotonic() + 120.0  # past the deadline, before a sweep
        refused = await ask(bus, alloc, kv.AllocateBlocks("w/r2", 1), kv.BlocksGranted)
        assert isinstance(refused, ErrorReply) and refused.code == "lease_expired"
        await bus.publish(subjects.kv(unit, "heartbeat"), encode(kv.Heartbeat("w")))
        await ask_ok(bus, alloc, kv.AllocateBlocks("w/r2", 1), kv.BlocksGranted)


async def test_malformed_requests_get_error_replies(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    async with running_kv_manager(nats_server.url, tiny) as service:
        unit = service.settings.unit
        alloc = subjects.kv(unit, "alloc")
        cases = {
            b"\xc1 not msgpack": "invalid_message",
            msgpack.packb(["kv.alloc", 2, {"owner": "a/b", "count": 1}]): "version_mismatch",
            msgpack.packb(["kv.nope", 1, {}]): "unknown_message",
            msgpack.packb(["kv.alloc", 1, {"owner": "a/b", "count": 0}]): "invalid_message",
            encode(kv.Heartbeat("a")): "invalid_message",
            encode(kv.AllocateBlocks("/r1", 1)): "invalid_owner",
        }
        for payload, code in cases.items():
            reply = await bus.request(alloc, payload)
            error = decode(reply.data, ErrorReply)
            assert error.code == code, (payload, error)
        for verb in ("heartbeat", "storage", "release", "retain"):
            await bus.publish(subjects.kv(unit, verb), b"garbage")
        reply = await bus.request(subjects.kv(unit, "storage"), b"garbage")
        assert decode(reply.data, ErrorReply).code == "invalid_message"
        granted = await ask_ok(bus, alloc, kv.AllocateBlocks("a/b", 8), kv.BlocksGranted)
        assert granted.num_free == 0  # still serving, and nothing leaked


async def test_runs_as_a_process_and_cleans_up(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    unit = new_unit()
    process = ServiceProcess(
        "kv_manager",
        DUET_NATS_URL=nats_server.url,
        DUET_MODEL=str(tiny),
        DUET_UNIT=unit,
        DUET_STORAGE="auto",
        DUET_DTYPE="bfloat16",
        DUET_KV_CACHE_MB="1",
    )
    try:
        data = await wait_for_reply(bus, subjects.kv(unit, "storage"), kv.StorageQuery("test"))
    finally:
        code = await process.stop()
    description = decode(data, kv.StorageDescription)
    output = process.output
    assert code == 0, output
    assert description.dtype == "bfloat16" and description.tensors[0].dtype == "bfloat16"
    pool_bytes = 2**20 // description.num_blocks
    assert description.num_blocks > 1 and pool_bytes >= description.tensors[0].shape[3]
    storage_lines = [line for line in output.splitlines() if '"storage: ' in line]
    assert storage_lines, output
    if description.kind == kv.StorageKind.CPU_SHARED_MEMORY:
        assert description.region == f"duet-{unit}-{process.pid}"
        assert not (Path("/dev/shm") / description.region).exists()  # unlinked at stop


async def _beat(bus: Bus, unit: str, holder: str, every_s: float) -> None:
    while True:
        await bus.publish(subjects.kv(unit, "heartbeat"), encode(kv.Heartbeat(holder)))
        await asyncio.sleep(every_s)


async def test_a_nats_outage_longer_than_the_lease_expires_nobody(
    tiny: Path, tmp_path: Path
) -> None:
    """nats-server dies for three leases: kv_manager hears no heartbeat, and no holder ever
    beat in vain. It must not expire them all, and once back each gets a full lease."""
    with NatsServer(tmp_path / "nats") as server:
        async with running_kv_manager(server.url, tiny, lease_s=0.5) as service:
            unit = service.settings.unit
            holder = await Bus.connect(server.url, "holder", request_timeout_s=1.0)
            beating = asyncio.create_task(_beat_forgiving(holder, unit, "live", every_s=0.1))
            try:
                alloc = subjects.kv(unit, "alloc")
                granted = await ask_ok(
                    holder, alloc, kv.AllocateBlocks("live/r1", 3), kv.BlocksGranted
                )
                server.stop()
                await asyncio.sleep(1.5)  # three leases without a heartbeat reaching it
                server.start()  # same port: both connections come back on their own
                deadline = time.monotonic() + 10
                while not (service.bus and service.bus.reconnects and holder.reconnects):
                    assert time.monotonic() < deadline, "not reconnected"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)  # two more leases, with heartbeats
                assert service.allocator is not None
                assert service.allocator.held_by("live/r1") == list(granted.block_ids)
                assert service.allocator.num_free == 8 - 3
            finally:
                beating.cancel()
                await holder.close()


async def _beat_forgiving(bus: Bus, unit: str, holder: str, every_s: float) -> None:
    """Heartbeats as a service sends them: a beat that cannot go out is skipped."""
    while True:
        with contextlib.suppress(Exception):
            await bus.publish(subjects.kv(unit, "heartbeat"), encode(kv.Heartbeat(holder)))
        await asyncio.sleep(every_s)


async def test_a_writer_whose_lease_lapsed_is_stopped_before_its_blocks_are_freed_and_fenced(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    """A worker frozen past its lease (SIGSTOP here) would resume mid-step and write blocks
    given away: kv_manager kills it first. Its name is fenced off: a late heartbeat is refused
    and does not revive the lease."""
    frozen = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)  # duetserve worker stand-in"]
    )
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        frozen.send_signal(signal.SIGSTOP)
        async with running_kv_manager(nats_server.url, tiny, lease_s=0.3) as service:
            unit = service.settings.unit
            beat = subjects.kv(unit, "heartbeat")
            host = socket.gethostname()
            for holder, process in (("frozen", frozen), ("bystander", bystander)):
                writer = kv.Heartbeat(holder, writes=True, pid=process.pid, host=host)
                renewed = await ask_ok(bus, beat, writer, kv.LeaseRenewed)
                assert renewed.lease_s == 0.3
                await ask_ok(
                    bus,
                    subjects.kv(unit, "alloc"),
                    kv.AllocateBlocks(f"{holder}/r", 2),
                    kv.BlocksGranted,
                )
            assert service.allocator is not None
            deadline = time.monotonic() + 5
            while service.allocator.num_free < 8 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert service.allocator.num_free == 8  # both leases lapsed, every block is back
            assert frozen.wait(timeout=1) == -signal.SIGKILL  # stopped before its blocks went
            assert bystander.poll() is None  # not a Duet process: its pid is left alone
            late = await ask(bus, beat, kv.Heartbeat("frozen"), kv.LeaseRenewed)
            assert isinstance(late, ErrorReply) and late.code == "fenced"
            refused = await ask(
                bus, subjects.kv(unit, "alloc"), kv.AllocateBlocks("frozen/s", 1), kv.BlocksGranted
            )
            assert isinstance(refused, ErrorReply) and refused.code == "fenced"
    finally:
        for process in (frozen, bystander):
            process.kill()
            process.wait()


async def test_poisoned_pool_counts_blocks_written_while_free(
    nats_server: NatsServer, bus: Bus, tiny: Path
) -> None:
    """DUET_KV_POISON: a write into a block nobody holds is found when the block is handed out
    again; writes into held blocks are not."""
    async with running_kv_manager(nats_server.url, tiny, num_blocks=4, kv_poison=True) as service:
        unit = service.settings.unit
        alloc, release = subjects.kv(unit, "alloc"), subjects.kv(unit, "release")
        stats = subjects.kv(unit, "stats")
        assert service.storage is not None
        pool = service.storage.tensors["kv_pool"]  # what a worker maps
        granted = await ask_ok(bus, alloc, kv.AllocateBlocks("a/r", 4), kv.BlocksGranted)
        for block in granted.block_ids:
            pool[:, :, block] = 0.5  # written while held: fine
        await ask_ok(bus, release, kv.ReleaseBlocks("a/r"), kv.BlocksReleased)
        pool[0, 1, granted.block_ids[2], 3] = 1.0  # a stale writer, after the release
        await ask_ok(bus, alloc, kv.AllocateBlocks("b/r", 4), kv.BlocksGranted)
        counted = await ask_ok(bus, stats, kv.KvStatsQuery(), kv.KvStats)
        assert counted.stale_writes == 1
        await ask_ok(bus, release, kv.ReleaseBlocks("b/r"), kv.BlocksReleased)
        await ask_ok(bus, alloc, kv.AllocateBlocks("c/r", 4), kv.BlocksGranted)
        assert (await ask_ok(bus, stats, kv.KvStatsQuery(), kv.KvStats)).stale_writes == 1
