"""cache_index with a running kv_manager over a real nats-server: the index holds what it
indexes, a match retains for the asker, tenants stay apart, eviction frees, refusals leave no
trace."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import NamedTuple

import numpy as np
import pytest
import torch

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import cache, kv, subjects
from duetserve.proto.codec import decode
from duetserve.proto.common import ErrorReply
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import kv_bytes_per_block
from duetserve.services.cache_index.service import CacheIndexService
from tests.conftest import ModelDirs
from tests.integration.unit_services import (
    ServiceProcess,
    ask,
    ask_ok,
    new_unit,
    num_free,
    running_cache_index,
    running_kv_manager,
    wait_for_reply,
)
from tests.model_specs import TINY

BLOCK = 4
NUM_BLOCKS = 16
PROMPT = tuple(range(100, 100 + 3 * BLOCK))  # three full blocks


class Unit(NamedTuple):
    name: str
    bus: Bus
    index: CacheIndexService


@pytest.fixture
async def unit(nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs) -> AsyncIterator[Unit]:
    tiny = model_dirs.get(TINY)
    async with (
        running_kv_manager(nats_server.url, tiny, num_blocks=NUM_BLOCKS, block_size=BLOCK) as kvm,
        running_cache_index(nats_server.url, kvm.settings.unit) as index,
    ):
        yield Unit(kvm.settings.unit, bus, index)


async def alloc(unit: Unit, owner: str, count: int) -> tuple[int, ...]:
    request = kv.AllocateBlocks(owner, count)
    granted = await ask_ok(unit.bus, subjects.kv(unit.name, "alloc"), request, kv.BlocksGranted)
    return granted.block_ids


async def release(unit: Unit, owner: str) -> kv.BlocksReleased:
    request = kv.ReleaseBlocks(owner)
    return await ask_ok(unit.bus, subjects.kv(unit.name, "release"), request, kv.BlocksReleased)


async def insert(unit: Unit, tenant: str, tokens: tuple[int, ...], ids: tuple[int, ...]) -> int:
    request = cache.PrefixInsert(tenant, tokens, ids)
    done = await ask_ok(
        unit.bus, subjects.cache(unit.name, "insert"), request, cache.PrefixInserted
    )
    return done.num_new


async def match(unit: Unit, owner: str, tenant: str, tokens: tuple[int, ...]) -> cache.PrefixMatch:
    query = cache.PrefixMatchQuery(owner, tenant, tokens)
    return await ask_ok(unit.bus, subjects.cache(unit.name, "match"), query, cache.PrefixMatch)


async def evict(unit: Unit, count: int) -> tuple[int, ...]:
    evicted = await ask_ok(
        unit.bus,
        subjects.cache(unit.name, "evict"),
        cache.EvictQuery(count),
        cache.Evicted,
    )
    return evicted.block_ids


async def test_the_index_holds_what_it_indexes_and_a_match_retains(unit: Unit) -> None:
    ids = await alloc(unit, "sched/r1", 3)
    assert await insert(unit, "tenant-a", PROMPT, ids) == 3
    released = await release(unit, "sched/r1")
    assert (released.num_freed, released.num_free) == (0, NUM_BLOCKS - 3)  # the index holds them

    found = await match(unit, "sched/r2", "tenant-a", (*PROMPT, 7))
    assert found == cache.PrefixMatch(ids, 3 * BLOCK)
    assert await num_free(unit.bus, unit.name) == NUM_BLOCKS - 3  # shared, not copied
    # r2 uses the blocks: eviction skips them (they would not come free) and they stay indexed.
    assert await evict(unit, 3) == ()
    assert (await release(unit, "sched/r2")).num_freed == 0
    # Once nobody else holds them, eviction drops the index's references and frees them.
    assert sorted(await evict(unit, 3)) == sorted(ids)
    assert await num_free(unit.bus, unit.name) == NUM_BLOCKS
    assert await match(unit, "sched/r3", "tenant-a", (*PROMPT, 7)) == cache.PrefixMatch((), 0)


async def test_a_tenant_does_not_match_another_tenants_private_prefix(unit: Unit) -> None:
    ids = await alloc(unit, "sched/r1", 3)
    assert await insert(unit, "tenant-a", PROMPT, ids) == 3
    await release(unit, "sched/r1")
    assert await match(unit, "sched/r2", "tenant-b", (*PROMPT, 7)) == cache.PrefixMatch((), 0)
    assert (await release(unit, "sched/r2")).num_freed == 0
    assert (await match(unit, "sched/r3", "tenant-a", PROMPT)).num_tokens == 2 * BLOCK


async def test_eviction_frees_the_blocks_in_kv_manager(unit: Unit) -> None:
    ids = await alloc(unit, "sched/r1", 3)
    assert await insert(unit, "tenant-a", PROMPT, ids) == 3
    await release(unit, "sched/r1")
    before = await num_free(unit.bus, unit.name)
    evicted = await evict(unit, 2)
    assert evicted == ids[:0:-1]  # leaves first: the deepest block, then its parent
    assert await num_free(unit.bus, unit.name) == before + 2
    assert (await match(unit, "sched/r2", "tenant-a", (*PROMPT, 7))).block_ids == ids[:1]
    assert await evict(unit, 5) == ()  # r2 now uses the last indexed block
    await release(unit, "sched/r2")
    assert await evict(unit, 5) == ids[:1]


async def test_refused_retains_leave_no_trace(unit: Unit) -> None:
    never_allocated = (9, 10, 11)
    assert await insert(unit, "tenant-a", PROMPT, never_allocated) == 0
    assert await match(unit, "sched/r1", "tenant-a", (*PROMPT, 7)) == cache.PrefixMatch((), 0)

    ids = await alloc(unit, "sched/r1", 3)
    assert await insert(unit, "tenant-a", PROMPT, ids) == 3
    # sched/r1 already holds these blocks: kv_manager refuses the retain, the match is empty.
    assert await match(unit, "sched/r1", "tenant-a", (*PROMPT, 7)) == cache.PrefixMatch((), 0)
    assert await insert(unit, "tenant-a", PROMPT, ids) == 0  # already indexed, nothing new
    await release(unit, "sched/r1")
    assert await num_free(unit.bus, unit.name) == NUM_BLOCKS - 3


async def test_malformed_requests_get_error_replies(unit: Unit) -> None:
    for subject in (
        subjects.cache(unit.name, "match"),
        subjects.cache(unit.name, "insert"),
        subjects.cache(unit.name, "evict"),
    ):
        reply = await unit.bus.request(subject, b"\xc1 not msgpack")
        assert decode(reply.data, ErrorReply).code == "invalid_message"
    negative = await ask(
        unit.bus,
        subjects.cache(unit.name, "evict"),
        cache.EvictQuery(-1),
        cache.Evicted,
    )
    assert isinstance(negative, ErrorReply) and negative.code == "invalid_request"
    ids = await alloc(unit, "sched/r1", 3)
    short = cache.PrefixInsert("tenant-a", PROMPT, ids[:2])
    refused = await ask(unit.bus, subjects.cache(unit.name, "insert"), short, cache.PrefixInserted)
    assert isinstance(refused, ErrorReply) and refused.code == "invalid_request"
    assert await insert(unit, "tenant-a", PROMPT, ids) == 3  # still serving


async def test_stop_gives_the_index_references_back(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    tiny = model_dirs.get(TINY)
    async with running_kv_manager(nats_server.url, tiny, num_blocks=8, block_size=BLOCK) as kvm:
        name = kvm.settings.unit
        async with running_cache_index(nats_server.url, name) as index:
            unit = Unit(name, bus, index)
            ids = await alloc(unit, "sched/r1", 3)
            assert await insert(unit, "tenant-a", PROMPT, ids) == 3
            await release(unit, "sched/r1")
            assert await num_free(bus, name) == 5
        assert await num_free(bus, name) == 8


async def test_a_lapsed_index_lease_clears_the_index(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    """Both of its indexes: the pool's and the host tier's (a lease on each)."""
    tiny, megabytes = model_dirs.get(TINY), host_tier_mb(model_dirs, 8)
    async with (
        running_kv_manager(
            nats_server.url,
            tiny,
            lease_s=0.3,
            block_size=BLOCK,
            host_kv_mb=megabytes,
            dtype="float32",
        ) as kvm,
        running_cache_index(
            nats_server.url, kvm.settings.unit, heartbeat_interval_s=30, host_kv_mb=megabytes
        ) as index,
    ):
        unit = Unit(kvm.settings.unit, bus, index)
        ids = await alloc(unit, "sched/r1", 3)
        assert await insert(unit, "tenant-a", PROMPT, ids) == 3
        request = kv.AllocateBlocks("sched/r1", 3)
        host_alloc = subjects.kv(unit.name, "alloc", kv.HOST_POOL)
        host_ids = (await ask_ok(bus, host_alloc, request, kv.BlocksGranted)).block_ids
        host_insert = cache.PrefixInsert("tenant-a", PROMPT, host_ids, pool=kv.HOST_POOL)
        await ask_ok(bus, subjects.cache(unit.name, "insert"), host_insert, cache.PrefixInserted)
        handlers = index.handlers
        assert handlers is not None and handlers.host_radix is not None
        assert handlers.host_radix.num_blocks == 3
        # kv_manager expires both holders within a few lease periods, in either order (they
        # lapse together; one sweep may take one and the next the other): wait for both.
        free = 0
        for _ in range(100):
            await asyncio.sleep(0.05)
            free = await num_free(bus, unit.name)
            if (
                handlers.radix.num_blocks == 0
                and handlers.host_radix.num_blocks == 0
                and free == 8
                and not await host_held(unit)
            ):
                break
        assert handlers.radix.num_blocks == 0 and handlers.host_radix.num_blocks == 0
        assert free == 8
        assert not await host_held(unit)


def host_tier_mb(model_dirs: ModelDirs, blocks: int) -> float:
    """DUET_HOST_KV_MB for a host tier of `blocks` blocks of `tiny` (float32, BLOCK tokens)."""
    config = ModelConfig.from_dir(model_dirs.get(TINY))
    return blocks * kv_bytes_per_block(config, BLOCK, torch.float32) / 2**20


async def host_held(unit: Unit) -> dict[str, int]:
    subject = subjects.kv(unit.name, "stats", kv.HOST_POOL)
    return (await ask_ok(unit.bus, subject, kv.KvStatsQuery(), kv.KvStats)).references_by_holder


async def test_the_host_tier_has_an_index_of_its_own_kept_to_half_the_tier(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    """Blocks a request left in the host tier are indexed there, matched only when asked for
    (retained for the asker in the host tier), and the index keeps at most half the tier,
    least recently used out first, never a block a request holds."""
    tiny, megabytes = model_dirs.get(TINY), host_tier_mb(model_dirs, 8)
    async with (
        running_kv_manager(
            nats_server.url, tiny, block_size=BLOCK, host_kv_mb=megabytes, dtype="float32"
        ) as kvm,
        running_cache_index(nats_server.url, kvm.settings.unit, host_kv_mb=megabytes) as index,
    ):
        unit = Unit(kvm.settings.unit, bus, index)
        host_alloc = subjects.kv(unit.name, "alloc", kv.HOST_POOL)
        host_release = subjects.kv(unit.name, "release", kv.HOST_POOL)

        async def leave_in_host(owner: str, tenant: str, tokens: tuple[int, ...]) -> tuple:
            request = kv.AllocateBlocks(owner, len(tokens) // BLOCK)
            ids = (await ask_ok(bus, host_alloc, request, kv.BlocksGranted)).block_ids
            insert = cache.PrefixInsert(tenant, tokens, ids, pool=kv.HOST_POOL)
            await ask_ok(bus, subjects.cache(unit.name, "insert"), insert, cache.PrefixInserted)
            await ask_ok(bus, host_release, kv.ReleaseBlocks(owner), kv.BlocksReleased)
            return ids

        ids = await leave_in_host("sched/r1", "tenant-a", PROMPT)
        assert await host_held(unit) == {index.holder: 3}
        # Asked for, the host blocks come with the (empty) pool match, retained for the asker.
        query = cache.PrefixMatchQuery("sched/r2", "tenant-a", (*PROMPT, 1), host=True)
        found = await ask_ok(bus, subjects.cache(unit.name, "match"), query, cache.PrefixMatch)
        assert (found.block_ids, found.num_tokens, found.host_block_ids) == ((), 0, ids)
        assert await host_held(unit) == {index.holder: 3, "sched": 3}
        assert await match(unit, "sched/r3", "tenant-a", (*PROMPT, 1)) == cache.PrefixMatch((), 0)
        # Another tenant's three blocks: six are over half the tier, so by the next match the
        # index has let two go: the newer prefix's, since r2 holds the older one.
        other = await leave_in_host("sched/r4", "tenant-b", PROMPT)
        query = cache.PrefixMatchQuery("sched/r5", "tenant-b", (*PROMPT, 1), host=True)
        found = await ask_ok(bus, subjects.cache(unit.name, "match"), query, cache.PrefixMatch)
        assert found.host_block_ids == other[:1]
        assert index.handlers is not None and index.handlers.host_radix is not None
        assert index.handlers.host_radix.num_blocks == 4
        assert await host_held(unit) == {index.holder: 4, "sched": 4}
        # The tier's pool index is untouched by all this.
        assert index.handlers.radix.num_blocks == 0


async def test_runs_as_a_process_after_waiting_for_kv_manager(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    name = new_unit()
    process = ServiceProcess(
        "cache_index", DUET_NATS_URL=nats_server.url, DUET_UNIT=name, DUET_INSTANCE="cache_index"
    )
    try:
        await process.wait_for_output("waiting for kv_manager")
        async with running_kv_manager(nats_server.url, model_dirs.get(TINY), unit=name) as kvm:
            query = cache.PrefixMatchQuery("sched/r1", "tenant-a", PROMPT)
            data = await wait_for_reply(bus, subjects.cache(name, "match"), query)
            assert decode(data, cache.PrefixMatch) == cache.PrefixMatch((), 0)
            allocator = kvm.allocator
            assert allocator is not None
            for _ in range(40):  # its heartbeats reach kv_manager
                if allocator.lease_deadline("cache_index") is not None:
                    break
                await asyncio.sleep(0.05)
            assert allocator.lease_deadline("cache_index") is not None
    finally:
        code = await process.stop()
    assert code == 0, process.output


def _doc(seed: int, length: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(10, 4000, length))


DOC_A, DOC_B = _doc(1, 160), _doc(2, 160)


@contextlib.asynccontextmanager
async def span_unit(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs, num_blocks: int
) -> AsyncIterator[Unit]:
    tiny = model_dirs.get(TINY)
    async with (
        running_kv_manager(nats_server.url, tiny, num_blocks=num_blocks, block_size=BLOCK) as kvm,
        running_cache_index(nats_server.url, kvm.settings.unit) as index,
    ):
        yield Unit(kvm.settings.unit, bus, index)


async def test_spans_are_found_anywhere_retained_and_forgotten_with_their_blocks(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    async with span_unit(nats_server, bus, model_dirs, 128) as unit:
        cached = _doc(3, 8) + DOC_A + DOC_B  # 82 full blocks
        ids = await alloc(unit, "sched/r1", len(cached) // BLOCK)
        assert await insert(unit, "tenant-a", cached, ids) == len(ids)
        await release(unit, "sched/r1")

        prompt = _doc(4, 8) + DOC_B + DOC_A + _doc(5, 6)  # another head: no prefix in common
        query = cache.PrefixMatchQuery("sched/r2", "tenant-a", prompt, spans=True)
        found = await ask_ok(unit.bus, subjects.cache(unit.name, "match"), query, cache.PrefixMatch)
        assert found.block_ids == () and found.spans
        assert sum(s.length for s in found.spans) >= 250
        by_block = {b: cached[i * BLOCK : (i + 1) * BLOCK] for i, b in enumerate(ids)}
        for span in found.spans:
            first = span.source_start // BLOCK
            source = [
                by_block[span.source_block_ids[p // BLOCK - first]][p % BLOCK]
                for p in range(span.source_start, span.source_start + span.length)
            ]
            assert list(prompt[span.start : span.start + span.length]) == source
        retained = set(found.span_block_ids)
        assert retained == {b for s in found.spans for b in s.source_block_ids}
        # r2 holds the spans' blocks: eviction skips them, and frees the rest.
        evicted = await evict(unit, len(ids))
        assert not retained & set(evicted)
        await release(unit, "sched/r2")

        # Another tenant finds nothing.
        other = cache.PrefixMatchQuery("sched/r3", "tenant-b", prompt, spans=True)
        assert await ask_ok(
            unit.bus, subjects.cache(unit.name, "match"), other, cache.PrefixMatch
        ) == (cache.PrefixMatch((), 0))
        # Once the radix lets the blocks go (with the ancestors they kept), no span names them.
        assert retained <= set(await evict(unit, len(ids)))
        again = cache.PrefixMatchQuery("sched/r4", "tenant-a", prompt, spans=True)
        assert await ask_ok(
            unit.bus, subjects.cache(unit.name, "match"), again, cache.PrefixMatch
        ) == (cache.PrefixMatch((), 0))
        assert await num_free(unit.bus, unit.name) == 128


async def test_public_spans_are_found_by_every_tenant(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    async with span_unit(nats_server, bus, model_dirs, 64) as unit:
        cached = _doc(3, 8) + DOC_A
        ids = await alloc(unit, "sched/r1", len(cached) // BLOCK)
        request = cache.PrefixInsert("tenant-a", cached, ids, public_spans=True)
        await ask_ok(unit.bus, subjects.cache(unit.name, "insert"), request, cache.PrefixInserted)
        await release(unit, "sched/r1")
        query = cache.PrefixMatchQuery("sched/r2", "tenant-b", _doc(6, 12) + DOC_A, spans=True)
        found = await ask_ok(unit.bus, subjects.cache(unit.name, "match"), query, cache.PrefixMatch)
        assert found.block_ids == () and sum(s.length for s in found.spans) >= 140
        await release(unit, "sched/r2")


async def test_a_peek_says_how_much_is_cached_and_holds_nothing(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    async with span_unit(nats_server, bus, model_dirs, 64) as unit:
        head = _doc(3, 8)
        cached = head + DOC_A
        ids = await alloc(unit, "sched/r1", len(cached) // BLOCK)
        await insert(unit, "tenant-a", cached, ids)
        await release(unit, "sched/r1")
        free = await num_free(unit.bus, unit.name)
        prompt = head + _doc(7, 8) + DOC_A + _doc(8, 5)
        query = cache.PrefixMatchQuery("", "tenant-a", prompt, spans=True, peek=True)
        found = await ask_ok(unit.bus, subjects.cache(unit.name, "match"), query, cache.PrefixMatch)
        assert found.block_ids == () and found.span_block_ids == ()
        assert found.num_tokens == len(head) and sum(s.length for s in found.spans) >= 140
        held = await kv_stats_of(unit)
        assert unit.index.handlers is not None
        assert set(held) == {unit.index.handlers.holder} and await num_free(bus, unit.name) == free


async def kv_stats_of(unit: Unit) -> dict[str, int]:
    subject = subjects.kv(unit.name, "stats")
    stats = await ask_ok(unit.bus, subject, kv.KvStatsQuery(), kv.KvStats)
    return {h: n for h, n in stats.references_by_holder.items() if n}
