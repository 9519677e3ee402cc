"""A prefill batch out when nats-server dies may have lost its message or its answer with it.
The scheduler, back on the bus, gives the batch up and prefills its requests again at once:
waiting for it stalled every prompt for the batch's whole wait (10 s at least, 120 s before any
batch was measured). A real scheduler, kv_manager and cache_index on a real nats-server that is
stopped and started again; the prefill worker is played by the test and never answers the
first batch."""

import asyncio
import time
from pathlib import Path

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import subjects, workers
from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import Sampling, Slo, SloKind, SubmitAccepted, SubmitRequest
from tests.conftest import ModelDirs
from tests.integration.unit_services import running_scheduler
from tests.model_specs import TINY

RESTARTED_WITHIN_S = 5.0  # from nats-server's start to the batch sent again; 120 s without


async def test_a_prefill_batch_out_when_nats_died_is_sent_again_once_back(
    tmp_path: Path, model_dirs: ModelDirs
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        async with running_scheduler(server.url, model_dirs.get(TINY)) as unit:
            await _play(server, unit)
    finally:
        server.stop()


async def _play(server: NatsServer, unit: str) -> None:
    bus = await Bus.connect(server.url, "played-prefill", reconnect_time_wait_s=0.05)
    batches: asyncio.Queue[workers.PrefillBatch] = asyncio.Queue()

    async def prefill(msg: Msg) -> None:  # takes every batch, answers none
        batches.put_nowait(decode(msg.data, workers.PrefillBatch))

    try:
        await bus.subscribe(workers.prefill_batch_subject(unit), prefill)
        await bus.flush()
        slo = Slo(SloKind.LATENCY, ttft_ms=1000, tpot_ms=100)
        submit = SubmitRequest("r-1", "default", (5, 6, 7), Sampling(8), 0.0, "played", slo)
        reply = await bus.request(subjects.sched(unit, "submit"), encode(submit))
        assert isinstance(decode(reply.data, SubmitAccepted), SubmitAccepted)
        first = await asyncio.wait_for(batches.get(), 10)
        assert [item.request_id for item in first.items] == ["r-1"]

        server.stop()  # the batch's answer, had one been sent, is lost with the server
        await asyncio.sleep(0.5)
        server.start()
        back = time.monotonic()
        again = await asyncio.wait_for(batches.get(), RESTARTED_WITHIN_S + 5)
        assert time.monotonic() - back < RESTARTED_WITHIN_S
        assert again.batch_id > first.batch_id
        assert [item.request_id for item in again.items] == ["r-1"]
    finally:
        await bus.close()
