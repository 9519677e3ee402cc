"""What every service asks of its unit's kv_manager before and while it works: the storage
description (waiting for kv_manager to come up) and the lease that keeps its blocks."""

import asyncio
import logging
import math
import os
import socket
import time

from duetserve.common.nats_bus import Bus, BusNoResponders, BusTimeout
from duetserve.common.processes import process_stat
from duetserve.proto import kv, subjects
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply

logger = logging.getLogger(__name__)
_RETRY_S = 0.2
# A release is answered in milliseconds; one lost in a NATS outage is sent again soon, and
# again until RELEASE_PATIENCE_S has passed (kv_manager restarting takes a few seconds; one
# that is gone for longer took the pool, and so the references, with it).
RELEASE_TIMEOUT_S = 1.0
RELEASE_PATIENCE_S = 15.0
# "No responders" comes back at once: the pause before asking again, doubling up to a second.
_NO_RESPONDERS_PAUSE_S = 0.05
_NO_RESPONDERS_PAUSE_MAX_S = 1.0


async def release_blocks(
    bus: Bus,
    unit: str,
    owner: str,
    pool: str = kv.UNIT_POOL,
    timeout_s: float = RELEASE_TIMEOUT_S,
    patience_s: float = RELEASE_PATIENCE_S,
) -> kv.BlocksReleased | None:
    """Give back every block `owner` holds in the pool; kv_manager's answer (None: refused, or
    never answered). A release lost on its way (sent into a NATS outage, say) would keep its
    blocks for as long as the sender lives, its lease renewed all along: it is sent again
    (releasing twice frees nothing twice) until `patience_s` has passed. Just after a NATS
    restart kv_manager may not have subscribed again yet: "no responders" comes back at once,
    and the next try waits a little. Errors are logged, never raised."""
    subject = subjects.kv(unit, "release", pool)
    deadline = time.monotonic() + patience_s
    pause_s = _NO_RESPONDERS_PAUSE_S
    attempt = 0
    while True:
        attempt += 1
        try:
            reply = await bus.request(subject, encode(kv.ReleaseBlocks(owner)), timeout_s)
        except BusTimeout as err:  # lost (or kv_manager away): again
            logger.warning("releasing %s (attempt %d): %s", owner, attempt, err)
            if time.monotonic() >= deadline:
                break
            if isinstance(err, BusNoResponders):
                await asyncio.sleep(pause_s)
                pause_s = min(2 * pause_s, _NO_RESPONDERS_PAUSE_MAX_S)
            continue
        try:
            answer = decode(reply.data, kv.BlocksReleased, ErrorReply)
        except ProtoError as err:
            logger.warning("releasing %s: %s", owner, err)
            return None
        if isinstance(answer, ErrorReply):
            logger.warning("releasing %s: %s", owner, answer.message)
            return None
        return answer
    logger.error("could not release the blocks of %s in %.0f s", owner, patience_s)
    return None


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


class LeaseLost(Exception):
    """kv_manager fenced the holder off: its lease lapsed and its blocks were released."""


class Lease:
    """A holder's lease on one of the unit's pools, kept by heartbeats sent as requests.

    The lease is known valid until the send time of the last acknowledged heartbeat plus the
    lease kv_manager grants: kv_manager's own deadline is later (it counts from receipt), so a
    holder that writes only while `remaining()` is positive never writes a block kv_manager
    may have given away. A writer waits (`wait_valid`) before each step; a lease that cannot be
    renewed (a NATS outage) therefore stalls the writer instead of letting it write blind.

    `keep()` beats until cancelled and raises LeaseLost once kv_manager answers `fenced`: the
    process must stop using its blocks, and its supervisor starts a new holder.
    """

    def __init__(
        self,
        bus: Bus,
        unit: str,
        holder: str,
        interval_s: float,
        pool: str = kv.UNIT_POOL,
        *,
        writes: bool = False,
    ) -> None:
        self.bus, self.holder, self.interval_s = bus, holder, interval_s
        self.subject = subjects.kv(unit, "heartbeat", pool)
        stat = process_stat(os.getpid())
        started = stat.started if stat is not None else 0
        host = socket.gethostname()
        self.beat = encode(kv.Heartbeat(holder, writes, os.getpid(), host, started))
        self.valid_until = -math.inf  # monotonic
        self.lease_s = math.inf  # as kv_manager granted it (inf until the first answer)
        self._renewed = asyncio.Event()

    def remaining(self) -> float:
        """Seconds the lease is surely valid from now (negative once it may have lapsed)."""
        return self.valid_until - time.monotonic()

    async def wait_valid(self, share: float = 0.5) -> None:
        """Return once the lease has at least `share` of a whole lease left: enough for a
        step to finish inside it."""
        while self.remaining() < share * self.lease_s:
            self._renewed.clear()
            try:
                await asyncio.wait_for(self._renewed.wait(), self.interval_s)
            except TimeoutError:
                continue

    async def keep(self) -> None:
        """Heartbeat every `interval_s` until cancelled; LeaseLost when fenced off."""
        level = logging.WARNING
        while True:
            sent = time.monotonic()
            try:
                reply = await self.bus.request(self.subject, self.beat, timeout=self.interval_s)
                answer = decode(reply.data, kv.LeaseRenewed, ErrorReply)
            except (BusTimeout, ProtoError) as err:
                logger.log(level, "heartbeat of %s unanswered: %s", self.holder, err)
                level = logging.DEBUG  # until one is answered again
            except Exception:  # the connection is gone for now; the next beat still goes
                logger.exception("heartbeat of %s not sent", self.holder)
            else:
                if isinstance(answer, ErrorReply):
                    if answer.code == "fenced":
                        raise LeaseLost(f"{self.holder}: {answer.message}")
                    logger.warning("heartbeat of %s refused: %s", self.holder, answer.message)
                else:
                    self.lease_s = answer.lease_s
                    self.valid_until = sent + answer.lease_s
                    self._renewed.set()
                    level = logging.WARNING
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - sent)))
