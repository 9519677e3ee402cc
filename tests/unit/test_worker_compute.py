"""A worker's compute share: settings, the model thread every share change runs on, and what
a refused split reports."""

import asyncio
import threading
import time

import pytest
import torch
from pydantic import ValidationError

from duetserve.proto.compute import ComputeShareApplied
from duetserve.runtime.compute_share import AppliedShare, BackendName, InvalidShareError
from duetserve.services.unit_worker.compute import (
    CLOSE_GRACE_S,
    ModelThreadStuck,
    WorkerCompute,
    watch_model_thread,
)
from duetserve.services.unit_worker.settings import UnitWorkerSettings, parse_cores


def test_parse_cores() -> None:
    assert parse_cores("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cores("2") == [2]
    assert parse_cores("1,0,1") == [0, 1]
    for bad in ("", "a", "3-1", "-1", "0-"):
        with pytest.raises(ValueError, match="unit_cores"):
            parse_cores(bad)


def test_settings_refuse_a_split_outside_zero_one_and_bad_cores() -> None:
    assert UnitWorkerSettings(prefill_share=0.3).prefill_share == 0.3
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValidationError):
            UnitWorkerSettings(prefill_share=share)
    with pytest.raises(ValidationError, match="unit_cores"):
        UnitWorkerSettings(unit_cores="x")
    with pytest.raises(ValidationError):
        UnitWorkerSettings(compute_share="gpu-magic")  # type: ignore[arg-type]


class RecordingShare:
    """A backend that sets torch's thread count like the CPU ones and records its thread."""

    in_place = True

    def __init__(self, refuse_below: float = 0.0) -> None:
        self.calls: list[tuple[float, int]] = []
        self.refuse_below = refuse_below
        self.closed = 0

    @property
    def name(self) -> BackendName:
        return "cpu-affinity"

    def apply(self, share: float) -> AppliedShare:
        if share < self.refuse_below:
            raise InvalidShareError(f"too small: {share}")
        self.calls.append((share, threading.get_ident()))
        torch.set_num_threads(1 if share < 0.5 else 2)
        return AppliedShare(self.name, "decode", share, share, 1, "cores", f"{share}")

    def close(self) -> None:
        self.closed += 1


def test_splits_run_on_the_model_thread_in_order_with_the_models_work() -> None:
    share = RecordingShare()
    compute = WorkerCompute(share, "decode")

    async def scenario() -> list[object]:
        model_thread = await compute.run(threading.get_ident)
        first = await compute.apply_split(0.7)  # decode gets 0.3
        threads_after_first = await compute.run(torch.get_num_threads)
        await compute.apply_split(0.2)  # decode gets 0.8
        threads_after_second = await compute.run(torch.get_num_threads)
        return [model_thread, first, threads_after_first, threads_after_second]

    model_thread, first, after_first, after_second = asyncio.run(scenario())
    assert [s for s, _ in share.calls] == [pytest.approx(0.3), pytest.approx(0.8)]
    assert {thread for _, thread in share.calls} == {model_thread}
    assert model_thread != threading.get_ident()
    assert isinstance(first, AppliedShare) and compute.applied is not None
    assert (after_first, after_second) == (1, 2)  # the per-thread setting is where it counts
    compute.close()
    assert share.closed == 1


def test_a_refused_split_is_reported_and_the_previous_share_holds() -> None:
    share = RecordingShare(refuse_below=0.25)
    compute = WorkerCompute(share, "prefill")

    async def scenario() -> tuple[ComputeShareApplied, ComputeShareApplied]:
        ok = await compute.report("w", 0.5, 1)
        refused = await compute.report("w", 0.1, 2)
        return ok, refused

    ok, refused = asyncio.run(scenario())
    compute.close()
    assert ok.error is None and ok.sequence == 1 and ok.requested == 0.5
    assert refused.sequence == 2 and refused.error is not None and "too small" in refused.error
    assert refused.given == 0.5
    assert compute.applied is not None and compute.applied.requested == 0.5


def test_a_model_call_that_never_returns_stops_the_worker_and_does_not_hang_its_close() -> None:
    """A call stuck on the model thread (the top_p loop once) kept its worker alive, serving
    nothing, and its close waited on it for ever."""
    share = RecordingShare()
    compute = WorkerCompute(share, "prefill")
    release = threading.Event()

    async def scenario() -> None:
        assert compute.busy_for() == 0.0
        stuck = asyncio.ensure_future(compute.run(release.wait))
        await asyncio.sleep(0.2)
        assert compute.busy_for() > 0.1
        with pytest.raises(ModelThreadStuck, match=r"DUET_MODEL_CALL_TIMEOUT_S=0\.1"):
            await asyncio.wait_for(watch_model_thread(compute, 0.1, poll_s=0.02), 5)
        started = time.monotonic()
        compute.close()  # bounded, though the call is still running
        assert time.monotonic() - started < CLOSE_GRACE_S + 1
        release.set()
        await stuck

    asyncio.run(scenario())
    assert share.closed == 1
    assert compute.busy_for() == 0.0
