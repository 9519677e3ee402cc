"""A prefill batch that leaves prompts behind has the next one planned, admitted and sent while
it computes, so the worker never waits for the scheduler's round trips between them (the
answer's hand-offs, prefix inserts and releases, then the next plan's admissions: ~65 ms of
single-sequence decode steps per batch on a 32-request burst). A third waits for an answer;
a batch that left nothing behind has prompts arriving meanwhile wait for its answer (and go
together); a request is never prefilled twice. A real scheduler, kv_manager and
cache_index on a real nats-server; the prefill worker is played by the test."""

import asyncio
from pathlib import Path

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import subjects, workers
from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import Sampling, Slo, SloKind, SubmitAccepted, SubmitRequest
from duetserve.proto.tokens import TokenLogprob
from duetserve.services.scheduler.core import MAX_BATCHES_OUT
from tests.conftest import ModelDirs
from tests.integration.unit_services import running_scheduler
from tests.model_specs import TINY


async def test_the_next_batch_goes_out_while_one_computes(
    tmp_path: Path, model_dirs: ModelDirs
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        one_a_batch = {"max_prefill_seqs": 1, "prefill_order": "arrival"}
        async with running_scheduler(server.url, model_dirs.get(TINY), 64, **one_a_batch) as unit:
            await _play(server, unit)
    finally:
        server.stop()


async def _play(server: NatsServer, unit: str) -> None:
    bus = await Bus.connect(server.url, "played-prefill")
    batches: asyncio.Queue[tuple[workers.PrefillBatch, Msg]] = asyncio.Queue()

    async def prefill(msg: Msg) -> None:  # takes every batch; the test answers them
        batches.put_nowait((decode(msg.data, workers.PrefillBatch), msg))

    async def submit(request_id: str, prompt: tuple[int, ...]) -> None:
        slo = Slo(SloKind.LATENCY, ttft_ms=1000, tpot_ms=100)
        request = SubmitRequest(request_id, "default", prompt, Sampling(8), 0.0, "played", slo)
        reply = await bus.request(subjects.sched(unit, "submit"), encode(request))
        assert isinstance(decode(reply.data, SubmitAccepted), SubmitAccepted)

    async def answer(batch: workers.PrefillBatch, msg: Msg) -> None:
        results = tuple(
            workers.PrefillResult(item.request_id, TokenLogprob(9, 0.0)) for item in batch.items
        )
        await bus.reply(msg, encode(workers.PrefillDone(batch.batch_id, results)))

    async def next_batch(timeout_s: float = 5.0) -> tuple[list[str], workers.PrefillBatch, Msg]:
        batch, msg = await asyncio.wait_for(batches.get(), timeout_s)
        return [item.request_id for item in batch.items], batch, msg

    try:
        await bus.subscribe(workers.prefill_batch_subject(unit), prefill)
        await bus.flush()
        assert MAX_BATCHES_OUT == 2
        await submit("r-0", (5, 6, 7))
        ids, first, first_msg = await next_batch(10)
        assert ids == ["r-0"]  # it left nothing behind: what comes now waits for its answer

        for n in (1, 2, 3):
            await submit(f"r-{n}", (8, 9, n))
        await asyncio.sleep(0.3)
        assert batches.empty()  # trickling prompts go out together, not one batch each

        await answer(first, first_msg)
        # One request a batch (max_prefill_seqs=1): each leaves the others behind, so the
        # next goes out before the one before is answered; two out at most.
        ids, second, second_msg = await next_batch()
        assert ids == ["r-1"]
        ids, third, third_msg = await next_batch()
        assert ids == ["r-2"]
        await asyncio.sleep(0.3)
        assert batches.empty()

        await answer(second, second_msg)
        ids, fourth, fourth_msg = await next_batch()
        assert ids == ["r-3"]
        await answer(third, third_msg)
        await answer(fourth, fourth_msg)
        await asyncio.sleep(0.3)
        assert batches.empty()  # answered prompts are prefilled once
    finally:
        await bus.close()
