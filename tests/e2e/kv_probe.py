"""Ask a running stack's kv_manager who holds blocks, and its scheduler for its counters."""

import asyncio

from duetserve.common.nats_bus import Bus
from duetserve.proto import kv, subjects
from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import SchedulerStats, SchedulerStatsQuery


async def kv_stats(nats_url: str, unit: str = "unit0", pool: str = kv.UNIT_POOL) -> kv.KvStats:
    bus = await Bus.connect(nats_url, "kv-probe")
    try:
        reply = await bus.request(subjects.kv(unit, "stats", pool), encode(kv.KvStatsQuery()))
        return decode(reply.data, kv.KvStats)
    finally:
        await bus.close()


async def scheduler_stats(nats_url: str) -> SchedulerStats:
    """The scheduler's counters, waited for as long as the bus's request timeout."""
    bus = await Bus.connect(nats_url, "stats-probe")
    try:
        reply = await bus.request(
            subjects.sched(subjects.DEFAULT_UNIT, "stats"), encode(SchedulerStatsQuery())
        )
        return decode(reply.data, SchedulerStats)
    finally:
        await bus.close()


async def allocated_blocks(
    nats_url: str, settle_s: float, pool: str = kv.UNIT_POOL
) -> dict[str, int]:
    """References by holder once everything but the prefix cache has let go (or whatever is
    still held after `settle_s`: a cancelled request releases asynchronously)."""
    held: dict[str, int] = {}
    for _ in range(max(1, int(settle_s / 0.1))):
        stats = await kv_stats(nats_url, pool=pool)
        held = {h: n for h, n in stats.references_by_holder.items() if n}
        if all(h.startswith("cache_index") for h in held):
            break
        await asyncio.sleep(0.1)
    return held
