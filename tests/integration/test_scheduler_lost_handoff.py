"""A hand-off whose answer is lost (a NATS restart) while the decode worker took the request
and finished it: the scheduler hears FINISHED for a request it still has as prefilling, and
its own references to the request's blocks come back then. They were kept for as long as the
scheduler lived (the record was forgotten, its blocks never released; the fault suite's NATS
kill found two). A real scheduler, kv_manager and cache_index on a real nats-server; the
prefill and decode workers are played by the test, the decode worker never answering."""

import asyncio
from pathlib import Path

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import kv, subjects, workers
from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import Sampling, SubmitAccepted, SubmitRequest
from duetserve.proto.tokens import TokenLogprob
from tests.conftest import ModelDirs
from tests.integration.unit_services import ask_ok, running_scheduler
from tests.model_specs import TINY


async def test_a_request_finished_on_a_decode_worker_whose_answer_was_lost_gives_back_its_blocks(
    tmp_path: Path, model_dirs: ModelDirs
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        quick = {"request_timeout_s": 0.5}
        async with running_scheduler(server.url, model_dirs.get(TINY), 32, **quick) as unit:
            await _play(server.url, unit)
    finally:
        server.stop()


async def _scheduler_references(bus: Bus, unit: str) -> int:
    stats = await ask_ok(bus, subjects.kv(unit, "stats"), kv.KvStatsQuery(), kv.KvStats)
    return sum(n for h, n in stats.references_by_holder.items() if h.startswith("scheduler"))


async def _play(url: str, unit: str) -> None:
    bus = await Bus.connect(url, "played-workers")
    admitted: asyncio.Queue[workers.DecodeAdmit] = asyncio.Queue()

    async def prefill(msg: Msg) -> None:
        batch = decode(msg.data, workers.PrefillBatch)
        results = tuple(
            workers.PrefillResult(item.request_id, TokenLogprob(9, 0.0)) for item in batch.items
        )
        await bus.reply(msg, encode(workers.PrefillDone(batch.batch_id, results)))

    async def admit(msg: Msg) -> None:  # takes it; the answer is lost on its way
        admitted.put_nowait(decode(msg.data, workers.DecodeAdmit))

    try:
        await bus.subscribe(workers.prefill_batch_subject(unit), prefill)
        await bus.subscribe(workers.decode_admit_subject(unit), admit)
        await bus.flush()
        request = SubmitRequest("r-1", "default", tuple(range(5, 45)), Sampling(4), 0.0, "played")
        reply = await bus.request(subjects.sched(unit, "submit"), encode(request))
        assert isinstance(decode(reply.data, SubmitAccepted), SubmitAccepted)
        offer = await asyncio.wait_for(admitted.get(), 10)
        assert [item.request_id for item in offer.items] == ["r-1"]
        assert await _scheduler_references(bus, unit) == 3  # 40 tokens in blocks of 16

        finished = workers.WorkerEvent(workers.EventKind.FINISHED, "r-1", num_output_tokens=4)
        events = workers.WorkerEvents("played-decode", (finished,))
        await bus.publish(workers.worker_events_subject(unit), encode(events))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0  # several unanswered offers' worth
        while await _scheduler_references(bus, unit) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert await _scheduler_references(bus, unit) == 0
    finally:
        await bus.close()
