"""Preemption by swap at the scheduler: a request its decode worker swapped out to the host
tier comes back without a prefill (the worker copies its KV back, past what the prefix cache
still holds), and one the worker cannot bring back (a refusal with swap_failed) is prefilled
again instead; the host tier's blocks come back either way. A real scheduler, kv_manager and
cache_index on a real nats-server; the workers are played by the test."""

import asyncio

import torch
from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import kv, subjects, workers
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


async def test_a_swapped_request_comes_back_without_prefill_or_is_prefilled_when_it_cannot(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    tiny = model_dirs.get(TINY)
    per_block = kv_bytes_per_block(ModelConfig.from_dir(tiny), 16, torch.float32)
    async with running_scheduler(
        nats_server.url, tiny, host_kv_mb=8 * per_block / 2**20, dtype="float32"
    ) as unit:
        await _play(bus, unit)


async def _play(bus: Bus, unit: str) -> None:
    batches: asyncio.Queue[workers.PrefillBatch] = asyncio.Queue()
    admits: asyncio.Queue[workers.DecodeItem] = asyncio.Queue()
    refuse_swaps = asyncio.Event()

    async def prefill(msg: Msg) -> None:
        batch = decode(msg.data, workers.PrefillBatch)
        batches.put_nowait(batch)
        token = TokenLogprob(OUTPUT[0], 0.0)
        results = tuple(workers.PrefillResult(i.request_id, token) for i in batch.items)
        await bus.reply(msg, encode(workers.PrefillDone(batch.batch_id, results)))

    async def admit(msg: Msg) -> None:
        items = decode(msg.data, workers.DecodeAdmit).items
        for item in items:
            admits.put_nowait(item)
        if refuse_swaps.is_set() and any(i.host_block_ids for i in items):
            why = "no host tier mapped here"
            refused = tuple(workers.Refusal(i.request_id, why, swap_failed=True) for i in items)
            await bus.reply(msg, encode(workers.DecodeAdmitted((), refused)))
            return
        taken = tuple(i.request_id for i in items)
        await bus.reply(msg, encode(workers.DecodeAdmitted(taken)))

    await bus.subscribe(workers.prefill_batch_subject(unit), prefill)
    await bus.subscribe(workers.decode_admit_subject(unit), admit)
    await bus.flush()
    submit = SubmitRequest("r1", "default", PROMPT, Sampling(64), 0.0, STREAM)
    reply = await bus.request(subjects.SCHED_SUBMIT, encode(submit))
    assert isinstance(decode(reply.data, SubmitAccepted), SubmitAccepted)
    first = await asyncio.wait_for(admits.get(), 10)
    assert first.host_block_ids == () and batches.qsize() == 1
    host_stats = subjects.kv(unit, "stats", kv.HOST_POOL)

    async def swap_out() -> tuple[int, ...]:
        """As the decode worker does: host blocks under the scheduler's owner, then PREEMPTED."""
        alloc = subjects.kv(unit, "alloc", kv.HOST_POOL)
        granted = await ask_ok(bus, alloc, kv.AllocateBlocks(first.owner, 2), kv.BlocksGranted)
        event = workers.WorkerEvent(
            workers.EventKind.PREEMPTED,
            "r1",
            output_token_ids=OUTPUT,
            host_block_ids=granted.block_ids,
            swap_s=0.001,
        )
        events = workers.WorkerEvents("decode-played", (event,))
        await bus.publish(workers.worker_events_subject(unit), encode(events))
        return granted.block_ids

    # Swapped out and back: straight to decode, the first block from the prefix cache, the
    # second from the host tier; no prefill; the host blocks released once it is taken.
    host_blocks = await swap_out()
    back = await asyncio.wait_for(admits.get(), 10)
    assert (back.host_start, back.host_block_ids) == (1, host_blocks[1:])
    assert back.state.output_token_ids == OUTPUT and len(back.block_table) == 2
    assert batches.qsize() == 1
    await _host_tier_free(bus, host_stats)

    # Again, and this time the worker cannot bring it back: prefilled from the start of what
    # the cache does not hold, into the blocks it was given; the host blocks come back.
    batches.get_nowait()  # the first prefill's
    refuse_swaps.set()
    await swap_out()
    refused = await asyncio.wait_for(admits.get(), 10)
    assert refused.host_block_ids
    again = await asyncio.wait_for(batches.get(), 10)
    [item] = again.items
    assert item.request_id == "r1" and item.block_table == refused.block_table
    # Recompute covers the prompt past the cached block and every output token so far.
    assert item.num_cached_tokens == 16
    assert item.token_ids == (PROMPT + OUTPUT)[16:]
    await _host_tier_free(bus, host_stats)


async def _host_tier_free(bus: Bus, subject: str) -> None:
    for _ in range(50):
        stats = await ask_ok(bus, subject, kv.KvStatsQuery(), kv.KvStats)
        if stats.num_free == stats.num_total:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"host tier blocks still held: {stats.references_by_holder}")
