"""A prefill batch's prefixes are indexed together: the scheduler sends every insert of the
batch before it waits for any answer, and hands a request off only once its own insert is
answered (cache_index takes its references to the blocks before it answers). They went one
round trip after another, on the way from a landed batch to its hand-off.

A real scheduler and kv_manager on a real nats-server; cache_index, the prefill worker and the
decode worker are played by the test. The played cache_index answers no insert until the
whole batch's are in: inserts sent one after another never get there."""

import asyncio
from pathlib import Path

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto import cache, subjects, workers
from duetserve.proto.codec import decode, encode
from duetserve.proto.scheduling import Sampling, SubmitAccepted, SubmitRequest
from duetserve.proto.tokens import TokenLogprob
from duetserve.services.scheduler.service import SchedulerService
from duetserve.services.scheduler.settings import SchedulerSettings
from tests.conftest import ModelDirs
from tests.integration.unit_services import running_kv_manager
from tests.model_specs import TINY

REQUESTS = ("r-0", "r-1", "r-2", "r-3")
REQUEST_TIMEOUT_S = 30.0  # an unanswered insert holds a one-at-a-time scheduler this long


async def test_a_batch_indexes_its_prefixes_at_once_and_hands_off_after(
    tmp_path: Path, model_dirs: ModelDirs
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        async with running_kv_manager(server.url, model_dirs.get(TINY), num_blocks=32) as kv:
            unit = kv.settings.unit
            settings = SchedulerSettings(
                nats_url=server.url,
                unit=unit,
                mode="semi-pd",
                split_control="static",
                request_timeout_s=REQUEST_TIMEOUT_S,
            )
            scheduler = SchedulerService(settings)
            await scheduler.start()
            try:
                await _play(server.url, unit)
            finally:
                await scheduler.stop()
    finally:
        server.stop()


async def _play(url: str, unit: str) -> None:
    bus = await Bus.connect(url, "played-workers")
    inserts: list[Msg] = []
    all_in = asyncio.Event()
    events: list[str] = []  # what happened, in order
    offered: asyncio.Queue[workers.DecodeAdmit] = asyncio.Queue()

    async def match(msg: Msg) -> None:
        decode(msg.data, cache.PrefixMatchQuery)
        await bus.reply(msg, encode(cache.PrefixMatch((), 0)))

    async def insert(msg: Msg) -> None:
        decode(msg.data, cache.PrefixInsert)
        inserts.append(msg)
        if len(inserts) == len(REQUESTS):  # the whole batch is in: answer every one
            all_in.set()
            for held in inserts:
                await bus.reply(held, encode(cache.PrefixInserted(1)))
            events.append("inserts answered")

    async def prefill(msg: Msg) -> None:
        batch = decode(msg.data, workers.PrefillBatch)
        results = tuple(
            workers.PrefillResult(item.request_id, TokenLogprob(9, 0.0)) for item in batch.items
        )
        events.append(f"prefilled {len(batch.items)}")
        await bus.reply(msg, encode(workers.PrefillDone(batch.batch_id, results)))

    async def admit(msg: Msg) -> None:  # takes the offer; its answer is the test's to skip
        offer = decode(msg.data, workers.DecodeAdmit)
        events.append(f"offered {len(offer.items)}")
        offered.put_nowait(offer)

    try:
        await bus.subscribe(subjects.cache(unit, "match"), match)
        await bus.subscribe(subjects.cache(unit, "insert"), insert)
        await bus.subscribe(workers.decode_admit_subject(unit), admit)
        await bus.flush()
        # No prefill worker yet: the four prompts wait, and go out in one batch once one runs.
        for request_id in REQUESTS:
            request = SubmitRequest(
                request_id, "default", tuple(range(5, 45)), Sampling(4), 0.0, "played"
            )
            reply = await bus.request(subjects.sched(unit, "submit"), encode(request))
            assert isinstance(decode(reply.data, SubmitAccepted), SubmitAccepted)
        await bus.subscribe(workers.prefill_batch_subject(unit), prefill)
        await bus.flush()

        # All four out before any was answered (one at a time, the second would wait 30 s).
        await asyncio.wait_for(all_in.wait(), 10)
        offer = await asyncio.wait_for(offered.get(), 10)
        assert sorted(item.request_id for item in offer.items) == list(REQUESTS)
        assert events[:3] == ["prefilled 4", "inserts answered", "offered 4"]
    finally:
        await bus.close()
