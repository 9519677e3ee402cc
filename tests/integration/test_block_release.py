"""A release lost on its way to kv_manager (sent into a NATS outage) is sent again. A prefill
worker's batch references were released once and never again: its lease kept being renewed,
so the blocks stayed held for as long as it lived (the fault suite's NATS kill found one).
A real nats-server; kv_manager is played by the test and loses the first release."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.common.unit_client import release_blocks
from duetserve.proto import kv, subjects
from duetserve.proto.codec import decode, encode
from duetserve.services.prefill_worker.service import PrefillWorkerService
from duetserve.services.prefill_worker.settings import PrefillSettings

UNIT = "unit0"


@asynccontextmanager
async def losing_first_release(url: str) -> AsyncIterator[list[str]]:
    """A kv_manager that never answers the first release it gets; the owners it was asked to
    release, in order, until the block ends."""
    bus = await Bus.connect(url, "played-kv-manager")
    asked: list[str] = []

    async def release(msg: Msg) -> None:
        owner = decode(msg.data, kv.ReleaseBlocks).owner
        asked.append(owner)
        if len(asked) > 1:
            await bus.reply(msg, encode(kv.BlocksReleased(owner, num_freed=3, num_free=61)))

    try:
        await bus.subscribe(subjects.kv(UNIT, "release"), release)
        await bus.flush()
        yield asked
    finally:
        await bus.close()


async def test_a_lost_release_is_sent_again(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        async with losing_first_release(server.url) as asked:
            bus = await Bus.connect(server.url, "worker")
            try:
                answer = await release_blocks(bus, UNIT, "worker/r-1", timeout_s=0.2)
            finally:
                await bus.close()
        assert asked == ["worker/r-1", "worker/r-1"]
        assert answer == kv.BlocksReleased("worker/r-1", num_freed=3, num_free=61)
    finally:
        server.stop()


async def test_a_prefill_worker_lets_go_of_its_batch_even_when_the_first_release_is_lost(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        async with losing_first_release(server.url) as asked:
            settings = PrefillSettings(nats_url=server.url, unit=UNIT, request_timeout_s=0.2)
            worker = PrefillWorkerService(settings)
            worker.bus = await Bus.connect(server.url, worker.instance)
            try:
                await asyncio.wait_for(worker._let_go(f"{worker.instance}/batch-7"), 10)
            finally:
                await worker.bus.close()
        assert asked == [f"{worker.instance}/batch-7"] * 2
    finally:
        server.stop()


async def test_a_release_waits_out_a_kv_manager_not_yet_back_on_the_bus(tmp_path: Path) -> None:
    """Just after nats-server restarts, the services reconnect one by one: a release sent
    before kv_manager has subscribed again is answered at once with "no responders", as fast
    as it is sent. Five such answers within 2 ms used up every attempt, and the decode
    worker kept the request's blocks for as long as it lived (the fault suite's NATS kill
    found six). It keeps asking for a while, pausing between "no responders"."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        bus = await Bus.connect(server.url, "worker")
        try:
            sending = asyncio.create_task(release_blocks(bus, UNIT, "worker/r-2", timeout_s=0.2))
            await asyncio.sleep(0.5)  # kv_manager is back only now
            async with losing_first_release(server.url) as asked:
                answer = await asyncio.wait_for(sending, 10)
        finally:
            await bus.close()
        assert asked == ["worker/r-2", "worker/r-2"]  # the first lost, as in the test above
        assert answer == kv.BlocksReleased("worker/r-2", num_freed=3, num_free=61)
    finally:
        server.stop()


async def test_a_prefill_worker_lets_go_of_a_retain_whose_answer_was_lost(tmp_path: Path) -> None:
    """kv_manager granted a batch's retain, and the answer was lost (nats-server killed just
    then): the worker refused the batch and never released, so the references stayed for as
    long as it lived, its lease renewed all along (the fault suite's NATS kill found two). A
    retain whose outcome is unknown is followed by a release of the batch's owner."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        played = await Bus.connect(server.url, "played-kv-manager")
        retained: list[str] = []
        released: list[str] = []

        async def retain(msg: Msg) -> None:  # granted, its answer lost
            retained.append(decode(msg.data, kv.RetainBlocks).owner)

        async def release(msg: Msg) -> None:
            owner = decode(msg.data, kv.ReleaseBlocks).owner
            released.append(owner)
            await played.reply(msg, encode(kv.BlocksReleased(owner, num_freed=2, num_free=62)))

        await played.subscribe(subjects.kv(UNIT, "retain"), retain)
        await played.subscribe(subjects.kv(UNIT, "release"), release)
        await played.flush()
        settings = PrefillSettings(nats_url=server.url, unit=UNIT, request_timeout_s=0.2)
        worker = PrefillWorkerService(settings)
        worker.bus = await Bus.connect(server.url, worker.instance)
        owner = f"{worker.instance}/batch-9"
        try:
            refused = await asyncio.wait_for(worker._hold(owner, (4, 5), ("sched/r-1",)), 10)
        finally:
            await worker.bus.close()
            await played.close()
        assert refused is not None and "could not hold" in refused
        assert retained == [owner]
        assert released == [owner]
    finally:
        server.stop()
