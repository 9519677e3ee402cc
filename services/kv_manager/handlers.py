"""kv_manager's handlers, one per verb of `subjects.kv(unit, verb)`, and the lease sweep.

alloc, retain, release and storage are request/reply: each request gets exactly one answer, the
result or an ErrorReply whose `code` says why (a ProtoError's code for a message that cannot be
decoded, the allocator's refusal otherwise: out_of_blocks, lease_expired, fenced, ...). A
request published without a reply subject is dropped unserved, so a block is never allocated
that nobody hears of; only a heartbeat renews all the same (unanswered).

The allocator is not thread-safe and needs no lock: only the event loop touches it, and no
handler awaits between reading it and changing it.
"""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.proto import kv
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.workers import EventKind, WorkerEvent, WorkerEvents, worker_events_subject
from duetserve.services.kv_manager.allocator import BlockAllocator, OwnerRelease, holder_of
from duetserve.services.kv_manager.errors import (
    AllocatorError,
    AlreadyHeld,
    DuplicateBlock,
    Fenced,
    InvalidCount,
    InvalidOwner,
    LeaseExpired,
    NotHeld,
    OutOfBlocks,
    UnknownBlock,
)
from duetserve.services.kv_manager.poison import PoisonCheck
from duetserve.services.kv_manager.reaper import Writer, stop_writer

logger = logging.getLogger(__name__)
T = TypeVar("T")
Clock = Callable[[], float]

ERROR_CODES: dict[type[AllocatorError], str] = {
    OutOfBlocks: "out_of_blocks",
    LeaseExpired: "lease_expired",
    InvalidOwner: "invalid_owner",
    InvalidCount: "invalid_count",
    UnknownBlock: "unknown_block",
    DuplicateBlock: "duplicate_block",
    NotHeld: "not_held",
    AlreadyHeld: "already_held",
    Fenced: "fenced",
}
INTERNAL_ERROR = "internal_error"


def error_code(err: AllocatorError) -> str:
    """The ErrorReply code of an allocator refusal (internal_error for a broken invariant)."""
    return ERROR_CODES.get(type(err), INTERNAL_ERROR)


def request_id_of(owner: str) -> str:
    """The request an owner answers for ("r-17" of "decode-0/r-17"); a bare holder's owner
    ("cache_index") stands for itself."""
    return owner.partition("/")[2] or owner


class KVHandlers:
    """Serves one of the unit's pools (allocator and storage description) over NATS."""

    def __init__(
        self,
        bus: Bus,
        allocator: BlockAllocator,
        description: kv.StorageDescription,
        *,
        unit: str,
        source: str,
        pool: str = kv.UNIT_POOL,
        clock: Clock = time.monotonic,
        poison: PoisonCheck | None = None,
    ) -> None:
        self.bus = bus
        self.allocator = allocator
        self.description = description
        self.unit = unit
        self.source = source  # this instance, as WorkerEvents.source
        self.pool = pool  # which of the unit's pools, as WorkerEvents.kv_pool
        self.clock = clock
        self.writers: dict[str, Writer] = {}  # holders that write the pool: their processes
        self.poison = poison  # DUET_KV_POISON: freed blocks poisoned, checked when handed out

    # ---- request/reply -----------------------------------------------------------------

    async def alloc(self, msg: Msg) -> None:
        await self._answer(msg, kv.AllocateBlocks, self._allocate)

    async def retain(self, msg: Msg) -> None:
        await self._answer(msg, kv.RetainBlocks, self._retain)

    async def release(self, msg: Msg) -> None:
        await self._answer(msg, kv.ReleaseBlocks, self._release)

    async def storage(self, msg: Msg) -> None:
        await self._answer(msg, kv.StorageQuery, self._describe)

    async def shared(self, msg: Msg) -> None:
        await self._answer(msg, kv.SharedBlocksQuery, self._shared)

    def _shared(self, query: kv.SharedBlocksQuery) -> kv.SharedBlocks:
        owners = self.allocator.owners_of
        return kv.SharedBlocks(tuple(b for b in query.block_ids if set(owners(b)) - {query.owner}))

    async def stats(self, msg: Msg) -> None:
        await self._answer(msg, kv.KvStatsQuery, self._stats)

    def _stats(self, _: kv.KvStatsQuery) -> kv.KvStats:
        allocator = self.allocator
        stale = self.poison.stale_writes if self.poison is not None else 0
        return kv.KvStats(
            allocator.num_free, allocator.num_total, allocator.references_by_holder(), stale
        )

    def _allocate(self, request: kv.AllocateBlocks) -> kv.BlocksGranted:
        block_ids = self.allocator.allocate(request.owner, request.count, self.clock())
        if self.poison is not None:
            self.poison.check(block_ids)
        return kv.BlocksGranted(request.owner, tuple(block_ids), self.allocator.num_free)

    def _retain(self, request: kv.RetainBlocks) -> kv.BlocksGranted:
        if request.held_by:
            wanted = set(request.held_by)
            for block in request.block_ids:
                if not wanted.intersection(self.allocator.owners_of(block)):
                    raise NotHeld(f"block {block} is no longer held by {sorted(wanted)}")
        self.allocator.retain(request.owner, request.block_ids, self.clock())
        return kv.BlocksGranted(request.owner, request.block_ids, self.allocator.num_free)

    def _release(self, request: kv.ReleaseBlocks) -> kv.BlocksReleased:
        if request.block_ids:
            freed = self.allocator.release(request.owner, request.block_ids)
        else:
            freed = self.allocator.release_owner(request.owner)
        if self.poison is not None:
            self.poison.poison(freed, [request.owner])
        return kv.BlocksReleased(request.owner, len(freed), self.allocator.num_free)

    def _describe(self, query: kv.StorageQuery) -> kv.StorageDescription:
        logger.info("storage described", extra={"worker": query.worker})
        return self.description

    async def _answer(self, msg: Msg, kind: type[T], serve: Callable[[T], object]) -> None:
        """Decode `msg` as `kind`, serve it, and reply with the result or an ErrorReply."""
        if not msg.reply:
            logger.warning(
                "request without a reply subject dropped", extra={"subject": msg.subject}
            )
            return
        answer: object
        try:
            answer = serve(decode(msg.data, kind))
        except ProtoError as err:
            logger.warning("malformed request", extra={"subject": msg.subject, "error": str(err)})
            answer = ErrorReply(err.code, str(err))
        except AllocatorError as err:
            code = error_code(err)
            if code == INTERNAL_ERROR:
                logger.error("allocator invariant broken", exc_info=err)
            answer = ErrorReply(code, str(err))
        except Exception as err:  # a bug must not leave the caller waiting for a timeout
            logger.exception("request failed", extra={"subject": msg.subject})
            answer = ErrorReply(INTERNAL_ERROR, f"{type(err).__name__}: {err}")
        await self.bus.reply(msg, encode(answer))

    # ---- publish -----------------------------------------------------------------------

    async def heartbeat(self, msg: Msg) -> None:
        """Renew the lease of the beating holder (and so of every owner under it). Answered
        (LeaseRenewed, or `fenced`) when sent as a request; a published beat gets no answer."""
        answer: object
        try:
            beat = decode(msg.data, kv.Heartbeat)
            self.allocator.renew(beat.holder, self.clock())
            if beat.writes:
                self.writers[beat.holder] = Writer(beat.pid, beat.host, beat.started)
            answer = kv.LeaseRenewed(beat.holder, self.allocator.lease_s)
        except (ProtoError, AllocatorError) as err:
            level = logging.DEBUG if isinstance(err, Fenced) else logging.WARNING
            logger.log(level, "heartbeat refused", extra={"error": str(err)})
            code = err.code if isinstance(err, ProtoError) else error_code(err)
            answer = ErrorReply(code, str(err))
        if msg.reply:
            await self.bus.reply(msg, encode(answer))

    # ---- leases ------------------------------------------------------------------------

    async def sweep_leases(self) -> list[OwnerRelease]:
        """Release every holder whose lease has passed, and tell the unit's scheduler (and
        anyone listening on the worker events subject) which owners lost their blocks."""
        now = self.clock()
        for holder in self.allocator.lapsed(now):
            writer = self.writers.pop(holder, None)
            if writer is not None and not await stop_writer(holder, writer):
                logger.error("freeing the blocks of %s, which may still write them", holder)
        releases = self.allocator.expire(now)
        if self.poison is not None:
            for release in releases:
                self.poison.poison(release.freed, [release.owner])
        if not releases:
            return releases
        free = self.allocator.num_free
        for holder in sorted({holder_of(r.owner) for r in releases}):
            lost = [r for r in releases if holder_of(r.owner) == holder]
            logger.warning(
                "lease expired: %s lost %d owner(s), %d block(s) freed",
                holder,
                len(lost),
                sum(len(r.freed) for r in lost),
                extra={"holder": holder, "num_free": free},
            )
        events = tuple(_lost_event(release) for release in releases)
        report = WorkerEvents(self.source, events, free_blocks=free, kv_pool=self.pool)
        await self.bus.publish(worker_events_subject(self.unit), encode(report))
        return releases


def _lost_event(release: OwnerRelease) -> WorkerEvent:
    holder = holder_of(release.owner)
    reason = (
        f"lease of {holder} expired: {len(release.held)} block reference(s) of "
        f"{release.owner} dropped, {len(release.freed)} block(s) freed"
    )
    return WorkerEvent(EventKind.LEASES_EXPIRED, request_id_of(release.owner), reason=reason)
