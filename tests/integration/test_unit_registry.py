"""The unit registry outlives a NATS restart: the scheduler's card writer keeps writing once
the server is back, and ingress's directory follows the new cards (its watch is set up again),
so routing never stays on a picture of the cluster from before the restart."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.services.ingress.units import UnitDirectory
from duetserve.services.scheduler.card import publish_cards
from tests.integration.scripted_scheduler import FakeCore


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def waiting_of(units: UnitDirectory, unit: str) -> int | None:
    return next((c.waiting for c in units.live() if c.unit == unit), None)


async def test_cards_are_followed_again_after_nats_restarts(tmp_path: Path) -> None:
    first = NatsServer(tmp_path).start()
    again = NatsServer(tmp_path, first.port)  # the same port and JetStream store
    writer_bus = await Bus.connect(first.url, "card-writer", reconnect_time_wait_s=0.05)
    reader_bus = await Bus.connect(first.url, "card-reader", reconnect_time_wait_s=0.05)
    core = FakeCore(waiting=1, running=0, limit=4)
    writer = asyncio.create_task(publish_cards(writer_bus, core, "u1", "s-u1", 0.1))  # type: ignore[arg-type]
    units = UnitDirectory("u0", stale_s=3.0)
    units.start(reader_bus)
    try:
        await until(lambda: waiting_of(units, "u1") == 1, 5.0)
        first.stop()
        await until(lambda: not reader_bus.is_connected, 5.0)
        core.waiting = 7  # what the unit's cards say from now on
        again.start()
        await until(lambda: reader_bus.is_connected and writer_bus.is_connected, 10.0)
        await until(lambda: waiting_of(units, "u1") == 7, 15.0)
        assert units.choose() == "u1"
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await units.stop()
        await writer_bus.close()
        await reader_bus.close()
        first.stop()
        again.stop()
