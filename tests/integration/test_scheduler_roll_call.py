"""A decoding request whose end on its worker was never heard of (the event lost on the bus)
does not stay at the scheduler for ever: the decode worker's roll calls no longer list it, and
it migrates. A real scheduler, kv_manager and cache_index on a real nats-server; the workers
are played by the test, so the lost event is one the worker never sends."""

import asyncio

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import subjects, workers
from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import (
    ResumeRequest,
    Sampling,
    SchedulerStats,
    SchedulerStatsQuery,
    Slo,
    SloKind,
    SubmitAccepted,
    SubmitRequest,
)
from duetserve.proto.tokens import TokenBatch, TokenChunk, TokenLogprob
from duetserve.services.scheduler.admission import DECREASE_FACTOR, STEP_WINDOWS
from tests.conftest import ModelDirs
from tests.integration.unit_services import running_scheduler
from tests.model_specs import TINY

STREAM = "roll-call-test"
FIRST_TOKEN = 42


async def test_a_decoding_request_no_worker_lists_any_more_migrates(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    async with running_scheduler(nats_server.url, model_dirs.get(TINY)) as unit:
        await _play(bus, unit)


async def _play(bus: Bus, unit: str) -> None:
    batches: asyncio.Queue[workers.PrefillBatch] = asyncio.Queue()
    admitted: asyncio.Queue[str] = asyncio.Queue()
    chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def prefill(msg: Msg) -> None:
        batch = decode(msg.data, workers.PrefillBatch)
        batches.put_nowait(batch)
        token = TokenLogprob(FIRST_TOKEN, 0.0)
        results = tuple(workers.PrefillResult(i.request_id, token) for i in batch.items)
        await bus.reply(msg, encode(workers.PrefillDone(batch.batch_id, results)))

    async def admit(msg: Msg) -> None:
        items = decode(msg.data, workers.DecodeAdmit).items
        for item in items:
            admitted.put_nowait(item.request_id)
        taken = tuple(i.request_id for i in items)
        await bus.reply(msg, encode(workers.DecodeAdmitted(taken)))

    async def stream(msg: Msg) -> None:
        for chunk in decode(msg.data, TokenBatch).chunks:
            chunks.put_nowait(chunk)

    await bus.subscribe(workers.prefill_batch_subject(unit), prefill)
    await bus.subscribe(workers.decode_admit_subject(unit), admit)
    await bus.subscribe(subjects.tokens(STREAM), stream)
    await bus.flush()
    slo = Slo(SloKind.LATENCY, ttft_ms=1000, tpot_ms=100)
    for request_id in ("r-kept", "r-lost"):
        submit = SubmitRequest(request_id, "default", (5, 6, 7), Sampling(64), 0.0, STREAM, slo)
        reply = await bus.request(subjects.sched(unit, "submit"), encode(submit))
        assert isinstance(decode(reply.data, SubmitAccepted), SubmitAccepted)
    handed = {await asyncio.wait_for(admitted.get(), 10) for _ in range(2)}
    assert handed == {"r-kept", "r-lost"}
    first_prefills = batches.qsize()

    # The decode worker ended r-lost (finished, preempted): that event never arrives. Its
    # roll calls list r-kept alone from now on.
    async def roll_calls() -> None:
        kept = (workers.ResidentSize("r-kept", 3, 1),)
        while True:
            events = workers.WorkerEvents("decode-played", (), residents=kept, roll_call=True)
            await bus.publish(workers.worker_events_subject(unit), encode(events))
            await asyncio.sleep(workers.ROLL_CALL_S)

    kept = (workers.ResidentSize("r-kept", 3, 1),)
    caller = asyncio.create_task(roll_calls())
    try:
        notice = await asyncio.wait_for(chunks.get(), 20)
        assert notice.request_id == "r-lost" and notice.migrating
        # Its client has two tokens of it: it goes on from there, prefilled again.
        output = (FIRST_TOKEN, 43)
        await bus.publish(subjects.sched(unit, "resume"), encode(ResumeRequest("r-lost", output)))
        while batches.qsize() == first_prefills:
            await asyncio.sleep(0.05)
        *_, again = [batches.get_nowait() for _ in range(batches.qsize())]
        [item] = again.items
        assert item.request_id == "r-lost"
        assert item.token_ids[-len(output) :] == output
        await asyncio.sleep(2 * workers.ROLL_CALL_S)
        assert chunks.empty()  # r-kept, listed all along, never moved
        # Its worker steps at 0.5 s a token, five times r-kept's TPOT target, for as many roll
        # calls as the running limit takes the median of: admission lets no more run at once
        # than 90% of what runs now.
        slow = workers.WorkerEvents("decode-played", (), residents=kept, roll_call=True, step_s=0.5)
        for _ in range(STEP_WINDOWS):
            await bus.publish(workers.worker_events_subject(unit), encode(slow))
        await asyncio.sleep(0.5)
        reply = await bus.request(subjects.sched(unit, "stats"), encode(SchedulerStatsQuery()))
        stats = decode(reply.data, SchedulerStats)
        running = stats.prefilling + stats.decoding
        assert stats.running_limit == max(1, int(DECREASE_FACTOR * running)), stats
    finally:
        caller.cancel()
