"""Preemption by swap at the scheduler: a request its decode worker swapped out to the host
tier comes back without a prefill (the worker copies its KV back, past what the prefix cache
still holds), and keeps its full blocks there, so that its next swap-out copies only the rest;
one the worker cannot bring back (a refusal with swap_failed) is prefilled again instead. When
a request ends, its host copy goes to the host tier's index, and the next turn of its
conversation loads it back instead of recomputing it. The host tier's blocks all come back.
A real scheduler, kv_manager and cache_index on a real nats-server; the workers are played by
the test."""

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch
from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import cache, kv, subjects, workers
from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import Sampling, SubmitAccepted, SubmitRequest
from duetserve.proto.tokens import TokenLogprob
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import kv_bytes_per_block
from tests.conftest import ModelDirs
from tests.integration.unit_services import ask_ok, running_scheduler
from tests.model_specs import TINY

STREAM = "swap-test"
PROMPT = tuple(range(5, 25))  # 20 tokens: one full block the prefix cache keeps, and a part
OUTPUT = (42, 43, 44)  # what the played decode worker produced before each preemption


@pytest.fixture
async def unit(nats_server: NatsServer, model_dirs: ModelDirs) -> AsyncIterator[str]:
    """A scheduler over a unit with a host tier of 8 blocks; its workers are the test's."""
    tiny = model_dirs.get(TINY)
    per_block = kv_bytes_per_block(ModelConfig.from_dir(tiny), 16, torch.float32)
    async with running_scheduler(
        nats_server.url, tiny, host_kv_mb=8 * per_block / 2**20, dtype="float32"
    ) as name:
        yield name


async def test_a_swapped_request_comes_back_without_prefill_or_is_prefilled_when_it_cannot(
    bus: Bus, unit: str
) -> None:
    await _play(bus, unit)


async def test_a_conversation_s_next_turn_loads_its_earlier_turn_from_the_host_tier(
    bus: Bus, unit: str
) -> None:
    await _next_turn(bus, unit)


class PlayedWorkers:
    """The unit's prefill and decode workers, played: prefill answers OUTPUT[0]; decode
    takes every admission (or refuses swap-ins when told) and copies KV loads (counted)."""

    def __init__(self, bus: Bus, unit: str) -> None:
        self.bus, self.unit = bus, unit
        self.batches: asyncio.Queue[workers.PrefillBatch] = asyncio.Queue()
        self.admits: asyncio.Queue[workers.DecodeItem] = asyncio.Queue()
        self.loads: asyncio.Queue[workers.KvLoad] = asyncio.Queue()
        self.refuse_swaps = asyncio.Event()

    async def start(self) -> None:
        await self.bus.subscribe(workers.prefill_batch_subject(self.unit), self._prefill)
        await self.bus.subscribe(workers.decode_admit_subject(self.unit), self._admit)
        await self.bus.subscribe(workers.kv_load_subject(self.unit), self._load)
        await self.bus.flush()

    async def _prefill(self, msg: Msg) -> None:
        batch = decode(msg.data, workers.PrefillBatch)
        self.batches.put_nowait(batch)
        token = TokenLogprob(OUTPUT[0], 0.0)
        results = tuple(workers.PrefillResult(i.request_id, token) for i in batch.items)
        await self.bus.reply(msg, encode(workers.PrefillDone(batch.batch_id, results)))

    async def _admit(self, msg: Msg) -> None:
        items = decode(msg.data, workers.DecodeAdmit).items
        for item in items:
            self.admits.put_nowait(item)
        if self.refuse_swaps.is_set() and any(i.host_block_ids for i in items):
            why = "no host tier mapped here"
            refused = tuple(workers.Refusal(i.request_id, why, swap_failed=True) for i in items)
            await self.bus.reply(msg, encode(workers.DecodeAdmitted((), refused)))
            return
        taken = tuple(i.request_id for i in items)
        await self.bus.reply(msg, encode(workers.DecodeAdmitted(taken)))

    async def _load(self, msg: Msg) -> None:
        load = decode(msg.data, workers.KvLoad)
        self.loads.put_nowait(load)
        await self.bus.reply(msg, encode(workers.KvLoaded(len(load.block_ids), 0.001)))

    async def swap_out(self, item: workers.DecodeItem, kv_tokens: int) -> tuple[int, ...]:
        """As the decode worker does: host blocks under the scheduler's owner for the blocks
        its host copy does not hold (item.host_kept), then PREEMPTED."""
        count = -(-(kv_tokens - 1) // 16) - item.host_kept
        alloc = subjects.kv(self.unit, "alloc", kv.HOST_POOL)
        request = kv.AllocateBlocks(item.owner, count)
        granted = await ask_ok(self.bus, alloc, request, kv.BlocksGranted)
        event = workers.WorkerEvent(
            workers.EventKind.PREEMPTED,
            item.request_id,
            output_token_ids=OUTPUT,
            host_block_ids=granted.block_ids,
            swap_s=0.001,
            host_kept=item.host_kept,
        )
        await self.events(event)
        return granted.block_ids

    async def events(self, *events: workers.WorkerEvent) -> None:
        report = workers.WorkerEvents("decode-played", events)
        await self.bus.publish(workers.worker_events_subject(self.unit), encode(report))


async def _play(bus: Bus, unit: str) -> None:
    played = PlayedWorkers(bus, unit)
    await played.start()
    batches, admits, refuse_swaps = played.batches, played.admits, played.refuse_swaps

    submit = SubmitRequest("r1", "default", PROMPT, Sampling(64), 0.0, STREAM)
    reply = await bus.request(subjects.sched(unit, "submit"), encode(submit))
    assert isinstance(decode(reply.data, SubmitAccepted), SubmitAccepted)
    first = await asyncio.wait_for(admits.get(), 10)
    assert first.host_block_ids == () and batches.qsize() == 1
    host_stats = subjects.kv(unit, "stats", kv.HOST_POOL)

    # Swapped out and back: straight to decode, the first block from the prefix cache, the
    # second from the host tier; no prefill. Its full block stays in the host tier (its host
    # copy, host_kept); the partial one goes back once it is taken.
    kv_tokens = len(PROMPT) + len(OUTPUT)
    host_blocks = await played.swap_out(first, kv_tokens)
    back = await asyncio.wait_for(admits.get(), 10)
    assert (back.host_start, back.host_block_ids) == (1, host_blocks[1:])
    assert back.state.output_token_ids == OUTPUT and len(back.block_table) == 2
    assert back.host_kept == 1
    assert batches.qsize() == 1
    await _host_tier_holds(bus, host_stats, {back.owner.split("/")[0]: 1})

    # Again: the swap copies only the block past the host copy. This time the worker cannot
    # bring it back: prefilled from the start of what the cache does not hold, into the
    # blocks it was given; the host blocks come back.
    batches.get_nowait()  # the first prefill's
    refuse_swaps.set()
    copied = await played.swap_out(back, kv_tokens)
    assert len(copied) == 1
    refused = await asyncio.wait_for(admits.get(), 10)
    assert refused.host_block_ids == copied and refused.host_start == 1
    again = await asyncio.wait_for(batches.get(), 10)
    [item] = again.items
    assert item.request_id == "r1" and item.block_table == refused.block_table
    # Recompute covers the prompt past the cached block and every output token so far.
    assert item.num_cached_tokens == 16
    assert item.token_ids == (PROMPT + OUTPUT)[16:]
    await _host_tier_free(bus, host_stats)


async def _next_turn(bus: Bus, unit: str) -> None:
    played = PlayedWorkers(bus, unit)
    await played.start()
    host_stats = subjects.kv(unit, "stats", kv.HOST_POOL)
    submit = SubmitRequest("t1", "default", PROMPT, Sampling(64), 0.0, STREAM)
    await ask_ok(bus, subjects.sched(unit, "submit"), submit, SubmitAccepted)
    first = await asyncio.wait_for(played.admits.get(), 10)
    await played.swap_out(first, len(PROMPT) + len(OUTPUT))
    back = await asyncio.wait_for(played.admits.get(), 10)
    assert back.host_kept == 1
    # It finishes: its host copy goes to the host tier's index, which now holds it alone.
    done = workers.WorkerEvent(workers.EventKind.FINISHED, "t1", num_output_tokens=5)
    await played.events(done)
    stats = await _host_tier_holds(bus, host_stats, None)
    [index_holder] = stats.references_by_holder
    assert index_holder.startswith("cache_index")
    # The prefix cache gives its pool blocks back (as under memory pressure).
    await ask_ok(bus, subjects.cache(unit, "evict"), cache.EvictQuery(64), cache.Evicted)

    # The conversation's next turn: the earlier turn's block is loaded from the host tier
    # into the new request's first block; prefill computes only the rest.
    turn = (*PROMPT, *OUTPUT, 7, 8, 9)
    submit = SubmitRequest("t2", "default", turn, Sampling(64), 0.0, STREAM)
    await ask_ok(bus, subjects.sched(unit, "submit"), submit, SubmitAccepted)
    load = await asyncio.wait_for(played.loads.get(), 10)
    batch = await asyncio.wait_for(played.batches.get(), 10)
    batch = await asyncio.wait_for(played.batches.get(), 10)  # the first was t1's
    [item] = batch.items
    assert load.owner.endswith("/t2") and load.block_ids == item.block_table[:1]
    assert item.num_cached_tokens == 16 and item.token_ids == turn[16:]
    second = await asyncio.wait_for(played.admits.get(), 10)
    assert second.request_id == "t2" and second.host_kept == 1  # its host copy, shared
    done = workers.WorkerEvent(workers.EventKind.FINISHED, "t2", num_output_tokens=5)
    await played.events(done)
    # Indexed once: the index keeps its own copy; t2's references come back.
    await _host_tier_holds(bus, host_stats, {index_holder: 1})


async def _host_tier_holds(bus: Bus, subject: str, holders: dict[str, int] | None) -> kv.KvStats:
    """Wait until the host tier's blocks are held as `holders` says (None: by one holder, one
    block); the stats then."""
    for _ in range(50):
        stats = await ask_ok(bus, subject, kv.KvStatsQuery(), kv.KvStats)
        held = dict(stats.references_by_holder)
        if held == holders or (holders is None and list(held.values()) == [1]):
            return stats
        await asyncio.sleep(0.1)
    raise AssertionError(f"host tier blocks held as {stats.references_by_holder}")


async def _host_tier_free(bus: Bus, subject: str) -> None:
    await _host_tier_holds(bus, subject, {})
