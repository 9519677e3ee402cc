"""A decode worker whose retain of an admitted request's blocks goes unanswered (lost in a NATS
restart, kv_manager slow) cannot tell whether kv_manager took it: it gives back whatever its
owner for the request holds before it refuses, and says to offer again. Before, the refusal
left the retain, if it had landed, held for as long as the worker lived, and the offer made
again failed the request ("already holds blocks"). A real nats-server; kv_manager is played
by the test and loses the answer to the first retain."""

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.common.token_outbox import TokenOutbox
from duetserve.proto import kv, subjects, workers
from duetserve.proto.codec import decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.scheduling import Sampling
from duetserve.services.decode_worker.settings import DecodeSettings
from duetserve.services.unit_worker.stepper import DecodeStepper

UNIT = "unit0"


async def test_a_retain_without_an_answer_is_given_back_and_the_request_offered_again(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        kv_bus = await Bus.connect(server.url, "played-kv-manager")
        worker_bus = await Bus.connect(server.url, "decode-1", request_timeout_s=0.3)
        try:
            await _play(kv_bus, worker_bus, server.url)
        finally:
            await worker_bus.close()
            await kv_bus.close()
    finally:
        server.stop()


async def _play(kv_bus: Bus, worker_bus: Bus, url: str) -> None:
    held: dict[str, tuple[int, ...]] = {}  # owner -> blocks, as kv_manager sees it
    retains = 0

    async def retain(msg: Msg) -> None:
        nonlocal retains
        request = decode(msg.data, kv.RetainBlocks)
        retains += 1
        if request.owner in held:
            refused = ErrorReply("already_held", f"{request.owner} already holds them")
            await kv_bus.reply(msg, encode(refused))
            return
        held[request.owner] = request.block_ids
        if retains > 1:  # the first one's answer is lost
            granted = kv.BlocksGranted(request.owner, request.block_ids, num_free=50)
            await kv_bus.reply(msg, encode(granted))

    async def release(msg: Msg) -> None:
        owner = decode(msg.data, kv.ReleaseBlocks).owner
        freed = held.pop(owner, ())
        await kv_bus.reply(msg, encode(kv.BlocksReleased(owner, len(freed), num_free=53)))

    await kv_bus.subscribe(subjects.kv(UNIT, "retain"), retain)
    await kv_bus.subscribe(subjects.kv(UNIT, "release"), release)
    await kv_bus.flush()

    settings = DecodeSettings(nats_url=url, unit=UNIT)
    host = SimpleNamespace(config=SimpleNamespace(vocab_size=1000))
    outbox = TokenOutbox(worker_bus, "decode-1")
    stepper = DecodeStepper(
        worker_bus, cast(Any, host), settings, "decode-1", cast(Any, None), outbox
    )
    state = workers.SamplingState((5, 6, 7), (9,), Sampling(8), "stream-1")
    item = workers.DecodeItem("r-1", (3, 4, 5), state, owner="scheduler/r-1")

    first = await asyncio.wait_for(stepper.admit((item,)), 10)
    assert first.request_ids == ()
    [refusal] = first.refused
    assert refusal.request_id == "r-1" and refusal.retry, refusal  # the scheduler offers it again
    assert held == {}  # what the lost retain took came back

    again = await asyncio.wait_for(stepper.admit((item,)), 10)
    assert again.request_ids == ("r-1",) and again.refused == ()
    assert held == {"decode-1/r-1": (3, 4, 5)}
    assert stepper.residents["r-1"].block_table == [3, 4, 5]
