"""Replacing a running worker without a pause (proto/compute.py): asking kv_manager for a
replacement, the replacement announcing that it serves, and the old worker handing over and
exiting on that announcement.

The old worker's part is given as `on_replaced`: stop taking work, finish the iteration in
hand, hand the residents over. Then it stops itself the way an operator would (SIGTERM: the
usual drain and stop, with nothing left to drain), and exits 0.
"""

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus, BusTimeout
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.compute import (
    HandedOver,
    HandOverReady,
    ReplacementStarted,
    ReplaceWorker,
    handover_subject,
    replace_worker_subject,
)
from duetserve.services.unit_worker.settings import UnitWorkerSettings

logger = logging.getLogger(__name__)
SPAWN_TIMEOUT_S = 10.0


async def request_replacement(
    bus: Bus, unit: str, role: str, replaces: str, env: dict[str, str], reason: str
) -> ReplacementStarted | ErrorReply:
    """Ask the unit's kv_manager to start a worker that takes over from `replaces`."""
    request = ReplaceWorker(role, replaces, env, reason)
    try:
        reply = await bus.request(replace_worker_subject(unit), encode(request), SPAWN_TIMEOUT_S)
        return decode(reply.data, ReplacementStarted, ErrorReply)
    except (BusTimeout, ProtoError) as err:
        return ErrorReply("unavailable", f"kv_manager did not start a replacement: {err}")


async def announce_ready(bus: Bus, settings: UnitWorkerSettings, instance: str) -> None:
    """A replacement, now serving, tells the worker it replaces to hand over."""
    if settings.replaces:
        await bus.publish(
            handover_subject(settings.unit), encode(HandOverReady(settings.replaces, instance))
        )
        logger.info("serving; asked %s to hand over", settings.replaces)


async def follow_handover(
    bus: Bus,
    settings: UnitWorkerSettings,
    instance: str,
    on_replaced: Callable[[], Awaitable[tuple[int, int]]],
) -> None:
    """When a replacement of this worker announces itself: `on_replaced` (it returns the
    requests handed over and preempted), a HandedOver report, then stop this process."""
    tasks: set[asyncio.Task[None]] = set()

    async def hand_over(ready: HandOverReady) -> None:
        started = time.perf_counter()
        handed = preempted = 0
        try:
            handed, preempted = await on_replaced()
        except Exception:
            logger.exception("hand-over to %s failed", ready.instance)
        seconds = time.perf_counter() - started
        logger.info(
            "handed over to %s in %.1f ms: %d request(s) handed over, %d preempted; stopping",
            ready.instance,
            1000 * seconds,
            handed,
            preempted,
        )
        report = HandedOver(instance, ready.instance, handed, preempted, seconds)
        await bus.publish(handover_subject(settings.unit), encode(report))
        os.kill(os.getpid(), signal.SIGTERM)

    async def on_ready(msg: Msg) -> None:
        try:
            ready = decode(msg.data, HandOverReady, HandedOver)
        except ProtoError as err:
            logger.warning("ignored a hand-over message: %s", err)
            return
        if not isinstance(ready, HandOverReady) or ready.replaces != instance or tasks:
            return
        task = asyncio.create_task(hand_over(ready), name="hand-over")
        tasks.add(task)  # kept: a task nobody references may be collected mid-way

    await bus.subscribe(handover_subject(settings.unit), on_ready)
