"""cache_index's handlers, one per subject: its unit's cache match, insert and evict, and the
unit's worker events (to learn that kv_manager dropped the index's own references).

One message at a time. nats-py runs one subscription's handlers in order, but each subject is
its own subscription, so every handler here holds one lock from the index lookup until its
kv_manager call has answered. That is what makes proto/cache.py's protocol safe: a matched block
is retained for the asking owner before anything can evict it, and an evicted block is released
before anything can match it again.

Invariant: the index names only blocks it holds a kv_manager reference to (as `holder`). An
insert therefore retains the blocks the index would adopt BEFORE indexing them: a refused retain
leaves the index as it was, with nothing to undo.

The host tier (kv.HOST_POOL) has a radix of its own (`host_radix`), under the same protocol and
lock, over the host blocks requests left there (cache.py). It keeps at most a share of the
host tier's blocks (DUET_HOST_CACHE_SHARE), least recently used out first, so that swaps find
room.

Spans (KVShare): every prompt the pool's radix indexes is also indexed by its chunks' content
(`spans`, span_cache.py) over the radix's own blocks, and forgotten block by block as the radix
lets them go, so a span never names a block the index does not hold.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.proto import cache, kv
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.workers import EventKind, WorkerEvents
from duetserve.services.cache_index.kv_client import KVCallFailed, KVClient
from duetserve.services.cache_index.radix import RadixIndex
from duetserve.services.cache_index.span_cache import SpanCache

logger = logging.getLogger(__name__)
T = TypeVar("T")
Clock = Callable[[], float]
NO_MATCH = cache.PrefixMatch((), 0)


class CacheHandlers:
    def __init__(
        self,
        bus: Bus,
        radix: RadixIndex,
        kv: KVClient,
        holder: str,
        clock: Clock = time.monotonic,
        host_radix: RadixIndex | None = None,
        host_limit: int = 0,
    ) -> None:
        self.bus = bus
        self.radix = radix
        self.kv = kv
        self.holder = holder  # kv_manager owner of the index's references
        self.clock = clock  # monotonic: the index refuses time that goes backwards
        self.lock = asyncio.Lock()
        # The host tier's index (None: the unit has none), kept to at most host_limit blocks
        # (a share of the tier: the rest stays for swaps, which never wait for an eviction;
        # one that finds no room recomputes instead).
        self.host_radix = host_radix
        self.host_limit = host_limit
        self.spans = SpanCache(radix.block_size)

    # ---- subjects ----------------------------------------------------------------------

    async def match(self, msg: Msg) -> None:
        await self._serve(msg, cache.PrefixMatchQuery, self._match)

    async def insert(self, msg: Msg) -> None:
        await self._serve(msg, cache.PrefixInsert, self._insert)

    async def evict(self, msg: Msg) -> None:
        await self._serve(msg, cache.EvictQuery, self._evict)

    async def worker_events(self, msg: Msg) -> None:
        """kv_manager reports lapsed leases here; if the index's own lapsed, every block it
        names may be free or reused by now, so it forgets them all."""
        try:
            report = decode(msg.data, WorkerEvents)
        except ProtoError as err:
            logger.debug("unreadable worker events ignored: %s", err)
            return
        # kv_manager names a bare owner (no "/request") by itself in request_id.
        if not any(
            e.kind == EventKind.LEASES_EXPIRED and e.request_id == self.holder
            for e in report.events
        ):
            return
        async with self.lock:
            if report.kv_pool == kv.HOST_POOL:
                self.forget_host(f"host-tier lease of {self.holder} expired")
            else:
                self.forget_all(f"lease of {self.holder} expired")

    def forget_all(self, why: str) -> None:
        """kv_manager dropped the index's references: every block it names may be free or
        reused by now. Call under `lock`."""
        if self.radix.num_blocks:
            logger.error(
                "kv_manager dropped the index's references (%s): forgetting %d indexed blocks",
                why,
                self.radix.num_blocks,
            )
        self.radix = RadixIndex(self.radix.block_size)
        self.spans.clear()

    def forget_host(self, why: str) -> None:
        """The same for the host tier's references. Call under `lock`."""
        if self.host_radix is None:
            return
        if self.host_radix.num_blocks:
            logger.error(
                "kv_manager dropped the index's host-tier references (%s): forgetting %d blocks",
                why,
                self.host_radix.num_blocks,
            )
        self.host_radix = RadixIndex(self.host_radix.block_size)

    # ---- what each does ----------------------------------------------------------------

    async def _match(self, query: cache.PrefixMatchQuery) -> cache.PrefixMatch:
        now = self.clock()
        found = self.radix.match(query.tenant, query.token_ids, query.public_prefix_tokens, now=now)
        if query.peek:  # how much, nothing held
            prefix = len(found.block_ids) * self.radix.block_size
            found_spans = (
                self.spans.match(query.tenant, query.token_ids, prefix) if query.spans else []
            )
            cached = tuple(
                cache.CachedSpan(s.start, s.length, s.source_start, ()) for s in found_spans
            )
            return cache.PrefixMatch((), prefix, (), cached)
        block_ids: tuple[int, ...] = ()
        if found.block_ids:
            try:
                await self.kv.retain(query.owner, found.block_ids)
                block_ids = tuple(found.block_ids)
            except KVCallFailed as err:
                logger.warning("match for %s not retained, answering none: %s", query.owner, err)
        spans: tuple[cache.CachedSpan, ...] = ()
        span_ids: tuple[int, ...] = ()
        if query.spans:
            spans, span_ids = await self._match_spans(query, block_ids, now)
        host_ids: tuple[int, ...] = ()
        if query.host and self.host_radix is not None:
            await self._trim_host()
            on_host = self.host_radix.match(
                query.tenant, query.token_ids, query.public_prefix_tokens, now=now
            )
            if on_host.block_ids:
                try:
                    await self.kv.retain(query.owner, on_host.block_ids, kv.HOST_POOL)
                    host_ids = tuple(on_host.block_ids)
                except KVCallFailed as err:
                    logger.warning("host match for %s not retained: %s", query.owner, err)
        if not block_ids and not host_ids and not spans:
            return NO_MATCH
        num_tokens = len(block_ids) * self.radix.block_size
        return cache.PrefixMatch(block_ids, num_tokens, host_ids, spans, span_ids)

    async def _match_spans(
        self, query: cache.PrefixMatchQuery, prefix: tuple[int, ...], now: float
    ) -> tuple[tuple[cache.CachedSpan, ...], tuple[int, ...]]:
        """Spans past the matched prefix, their source blocks retained for the owner (those
        the prefix retained already aside); none when the retain is refused."""
        begin = len(prefix) * self.radix.block_size
        found = self.spans.match(query.tenant, query.token_ids, begin)
        if not found:
            return (), ()
        held = set(prefix)
        blocks = list(dict.fromkeys(b for s in found for b in s.source_block_ids if b not in held))
        if blocks:
            try:
                await self.kv.retain(query.owner, blocks)
            except KVCallFailed as err:
                logger.warning("spans for %s not retained, answering none: %s", query.owner, err)
                return (), ()
        self.radix.touch(blocks, now=now)
        spans = tuple(
            cache.CachedSpan(s.start, s.length, s.source_start, s.source_block_ids) for s in found
        )
        return spans, tuple(blocks)

    async def _insert(self, insert: cache.PrefixInsert) -> cache.PrefixInserted:
        pool = insert.pool
        if pool not in (kv.UNIT_POOL, kv.HOST_POOL):
            raise ValueError(f"no index of pool {pool!r}")
        radix = self.radix if pool == kv.UNIT_POOL else self.host_radix
        if radix is None:
            raise ValueError("this unit has no host tier")
        if pool == kv.HOST_POOL and self.host_limit == 0:
            return cache.PrefixInserted(0)  # DUET_HOST_CACHE_SHARE=0: it keeps none
        now = self.clock()
        adopt = self._blocks_to_adopt(radix, insert, now)
        if adopt:
            try:
                await self.kv.retain(self.holder, adopt, pool)
            except KVCallFailed as err:
                logger.warning("insert of %d blocks not retained, skipped: %s", len(adopt), err)
                if err.uncertain:
                    await self._release(adopt, pool)
                return cache.PrefixInserted(0)
        try:
            result = radix.insert(
                insert.tenant,
                insert.token_ids,
                insert.block_ids,
                insert.public_prefix_tokens,
                now=now,
            )
        except ValueError:
            await self._release(adopt, pool)
            raise
        surplus = set(adopt) - set(result.adopted)
        if surplus:  # never expected: retained but not adopted
            logger.error("retained blocks the index did not adopt: %s", sorted(surplus))
            await self._release(sorted(surplus), pool)
        if pool == kv.HOST_POOL:
            await self._trim_host()
        else:
            self._index_spans(insert, now)
        return cache.PrefixInserted(result.num_new)

    def _index_spans(self, insert: cache.PrefixInsert, now: float) -> None:
        """The prompt's full blocks as the radix now holds them (its own copies where it had
        the content already), indexed by their chunks."""
        bs = self.radix.block_size
        num_full = len(insert.token_ids) // bs
        probe = (*insert.token_ids[: num_full * bs], 0)
        path = self.radix.match(insert.tenant, probe, insert.public_prefix_tokens, now=now)
        self.spans.add(insert.tenant, insert.token_ids, path.block_ids, insert.public_spans)

    async def _trim_host(self) -> None:
        """Evict the host index's least recently used blocks down to `host_limit`. Blocks a
        request holds (loaded back, its host copy, just inserted) stay: they would not come
        free. After each host insert, and before each host match (by then an inserter has
        let go of what it inserted)."""
        radix = self.host_radix
        if radix is None or radix.num_blocks <= self.host_limit:
            return
        try:
            in_use = await self.kv.shared(self.holder, radix.block_ids(), kv.HOST_POOL)
        except KVCallFailed as err:
            logger.warning("could not ask which host blocks are in use: %s", err)
            return
        evicted = radix.evict(radix.num_blocks - self.host_limit, keep=in_use.__contains__)
        await self._release(evicted, kv.HOST_POOL)

    def _blocks_to_adopt(
        self, radix: RadixIndex, insert: cache.PrefixInsert, now: float
    ) -> list[int]:
        """The ids `radix.insert` would adopt: the full blocks past the cached prefix.

        The lookup appends one token so that `match` (which always leaves the last prompt token
        to compute) may cover every full block; a block's key depends on its own and earlier
        tokens only, so the extra token changes nothing else.
        """
        block_size = radix.block_size
        num_full = len(insert.token_ids) // block_size
        if len(insert.block_ids) < num_full:
            raise ValueError(f"{num_full} full blocks but only {len(insert.block_ids)} block ids")
        probe = (*insert.token_ids[: num_full * block_size], 0)
        cached = radix.match(insert.tenant, probe, insert.public_prefix_tokens, now=now)
        return list(insert.block_ids[len(cached.block_ids) : num_full])

    async def _evict(self, query: cache.EvictQuery) -> cache.Evicted:
        """LRU over the blocks no request uses: blocks someone besides the index holds would
        not come free, so they stay indexed (and reusable) and are skipped."""
        try:
            in_use = await self.kv.shared(self.holder, self.radix.block_ids())
        except KVCallFailed as err:
            logger.warning("could not ask which blocks are in use: %s", err)
            in_use = set()
        evicted = self.radix.evict(query.num_blocks, keep=in_use.__contains__)
        if evicted:
            self.spans.forget(evicted)
            await self._release(evicted)
        return cache.Evicted(tuple(evicted))

    async def _release(self, block_ids: list[int], pool: str = kv.UNIT_POOL) -> None:
        """Drop the index's references; a failure is logged (the blocks stay held by the
        index's owner until it is released whole, at the next start or a lapsed lease)."""
        if not block_ids:
            return
        try:
            await self.kv.release(self.holder, block_ids, pool)
        except KVCallFailed as err:
            logger.error("could not release %d blocks: %s", len(block_ids), err)

    async def _serve(
        self, msg: Msg, kind: type[T], serve: Callable[[T], Awaitable[object]]
    ) -> None:
        """Decode `msg` as `kind` and serve it under the lock; reply with the result or an
        ErrorReply (invalid_message, invalid_request, internal_error)."""
        if not msg.reply:
            logger.warning(
                "request without a reply subject dropped", extra={"subject": msg.subject}
            )
            return
        answer: object
        async with self.lock:
            try:
                answer = await serve(decode(msg.data, kind))
            except ProtoError as err:
                answer = ErrorReply(err.code, str(err))
            except ValueError as err:  # the index refused: bad token ids, counts, block ids
                answer = ErrorReply("invalid_request", str(err))
            except Exception as err:  # a bug must not leave the caller waiting for a timeout
                logger.exception("request failed", extra={"subject": msg.subject})
                answer = ErrorReply("internal_error", f"{type(err).__name__}: {err}")
        if isinstance(answer, ErrorReply):
            logger.warning("refused", extra={"subject": msg.subject, "code": answer.code})
        await self.bus.reply(msg, encode(answer))
