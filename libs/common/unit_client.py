"""What every service asks of its unit's kv_manager before and while it works: the storage
description (waiting for kv_manager to come up) and the heartbeat that keeps its leases."""

import asyncio
import logging

from duetserve.common.nats_bus import Bus, BusTimeout
from duetserve.proto import kv, subjects
from duetserve.proto.codec import ProtoError, decode, encode

logger = logging.getLogger(__name__)
_RETRY_S = 0.2


async def fetch_storage(
    bus: Bus, unit: str, instance: str, pool: str = kv.UNIT_POOL
) -> kv.StorageDescription:
    """The storage description of one of the unit's pools; waits (retrying) until kv_manager
    answers."""
    query = encode(kv.StorageQuery(instance))
    level = logging.INFO  # the first wait is news; the retries are not
    while True:
        try:
            reply = await bus.request(subjects.kv(unit, "storage", pool), query)
            return decode(reply.data, kv.StorageDescription)
        except (BusTimeout, ProtoError) as err:
            logger.log(level, "waiting for kv_manager of unit %s: %s", unit, err)
            level = logging.DEBUG
            await asyncio.sleep(_RETRY_S)


async def heartbeat_forever(
    bus: Bus, unit: str, holder: str, interval_s: float, pool: str = kv.UNIT_POOL
) -> None:
    """Renew `holder`'s lease on one of the unit's pools every `interval_s`; a failed publish
    (a dropped connection) is logged and the next beat still goes."""
    beat = encode(kv.Heartbeat(holder))
    subject = subjects.kv(unit, "heartbeat", pool)
    while True:
        try:
            await bus.publish(subject, beat)
        except Exception:
            logger.exception("heartbeat not sent", extra={"holder": holder})
        await asyncio.sleep(interval_s)
