"""Moving a split by process (cuda-mps): a worker whose share cannot change in place asks the
unit's kv_manager for a replacement with the new percentage, once; kv_manager refuses what a
replacement may not be started with. (The hand-over itself runs in tests/e2e/test_handover.)"""

import asyncio

import msgpack
import pytest
from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto.codec import decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.compute import (
    ComputeShareApplied,
    ReplacementStarted,
    ReplaceWorker,
    SetComputeSplit,
    compute_applied_subject,
    compute_split_subject,
    replace_worker_subject,
)
from duetserve.runtime.compute_share.mps import PERCENT_ENV, MpsShare
from duetserve.services.unit_worker.compute import WorkerCompute, follow_splits
from duetserve.services.unit_worker.settings import UnitWorkerSettings
from tests.conftest import ModelDirs
from tests.integration.unit_services import new_unit, running_kv_manager
from tests.model_specs import TINY


async def test_an_mps_split_asks_for_one_replacement_with_the_new_percentage(
    nats_server: NatsServer, bus: Bus
) -> None:
    unit = new_unit()
    settings = UnitWorkerSettings(nats_url=nats_server.url, unit=unit, prefill_share=0.5)
    compute = WorkerCompute(MpsShare("decode", started_percent=50), "decode")
    requests: asyncio.Queue[ReplaceWorker] = asyncio.Queue()
    applied: asyncio.Queue[ComputeShareApplied] = asyncio.Queue()

    async def on_replace(msg: Msg) -> None:
        request = decode(msg.data, ReplaceWorker)
        requests.put_nowait(request)
        await bus.reply(msg, encode(ReplacementStarted(request.role, request.replaces, 4242)))

    async def on_applied(msg: Msg) -> None:
        applied.put_nowait(decode(msg.data, ComputeShareApplied))

    await bus.subscribe(replace_worker_subject(unit), on_replace)
    await bus.subscribe(compute_applied_subject(unit), on_applied)
    try:
        await follow_splits(bus, compute, settings, "decode-w1")
        start = await asyncio.wait_for(applied.get(), 5)
        assert start.error is None and start.given == 0.5  # started at 50%: nothing to do
        for sequence, share in ((1, 0.3), (2, 0.2)):  # the second arrives while replacing
            split = SetComputeSplit(share, sequence, "test")
            await bus.publish(compute_split_subject(unit), encode(split))
            refused = await asyncio.wait_for(applied.get(), 5)
            assert refused.error is not None and "new worker" in refused.error
        request = await asyncio.wait_for(requests.get(), 5)
        assert (request.role, request.replaces) == ("decode", "decode-w1")
        assert request.env[PERCENT_ENV] == "70" and request.env["DUET_PREFILL_SHARE"] == "0.3"
        await asyncio.sleep(0.3)
        assert requests.empty()  # one replacement, not one per split
    finally:
        compute.close()


async def test_kv_manager_refuses_a_replacement_it_may_not_start(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    async with running_kv_manager(nats_server.url, model_dirs.get(TINY)) as service:
        subject = replace_worker_subject(service.settings.unit)
        cases = {
            "decode": {"LD_PRELOAD": "/tmp/x.so"},
            "scheduler": {},
        }
        for role, env in cases.items():
            body = {"role": role, "replaces": "w", "env": env, "reason": ""}
            reply = await bus.request(subject, msgpack.packb(["compute.replace", 1, body]))
            error = decode(reply.data, ErrorReply)
            assert error.code == "invalid_message", error
        assert service.replacements.children == []
    with pytest.raises(ValueError, match="cannot be started with"):
        ReplaceWorker("decode", "w", {"PATH": "/tmp"})
