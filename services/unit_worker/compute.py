"""A worker's compute share, and the one thread its model runs on.

Every model call of a worker (loading, prefill batches, decode steps) and every change of its
share run on one dedicated thread, in order. So a new split lands between two iterations,
never inside one, and torch's intra-op thread count (a per-thread setting) is set in the
thread that runs the model.

A call that never returns (a kernel spinning: a sampling loop once did) would leave a worker
alive and serving nothing. `watch_model_thread` raises once a call has run past the worker's
DUET_MODEL_CALL_TIMEOUT_S, as a critical task, so the worker stops and its supervisor starts
it again; `close` does not wait on such a call for more than CLOSE_GRACE_S."""

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch
from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.compute import (
    ComputeShareApplied,
    SetComputeSplit,
    compute_applied_subject,
    compute_split_subject,
)
from duetserve.runtime.compute_share import (
    AppliedShare,
    ComputeShare,
    ComputeShareError,
    RestartRequiredError,
    Role,
    ShareOptions,
    open_compute_share,
    probe_machine,
    select_backend,
)
from duetserve.runtime.compute_share.activity import UnitActivity, activity_path
from duetserve.services.unit_worker.handover import request_replacement
from duetserve.services.unit_worker.settings import UnitWorkerSettings, parse_cores

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
CLOSE_GRACE_S = 5.0  # how long `close` waits for a model call still running


class ModelThreadStuck(RuntimeError):
    """A model call has run far longer than any call should."""


class WorkerCompute:
    def __init__(self, share: ComputeShare, role: Role, cores: int = 1) -> None:
        self.share, self.role, self.cores = share, role, cores
        self.applied: AppliedShare | None = None
        # What a replacement must be started with, once the backend said it cannot change
        # this process's share in place (cuda-mps); None otherwise.
        self.restart_env: dict[str, str] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"{role}-model")
        self._busy_since: float | None = None  # monotonic start of the call running now
        # semi-pd on the cpu-cgroup weight: the two workers' work, for a thread count that
        # never outnumbers the cores (attach_activity)
        self.activity: UnitActivity | None = None
        self.threads = torch.get_num_threads()  # the model thread's, as its last call began

    @classmethod
    def open(cls, settings: UnitWorkerSettings, role: Role) -> "WorkerCompute":
        """Probe the machine, pick the backend the settings ask for (or the best one) and open
        this worker's share; BackendUnavailableError says why a requested one cannot run."""
        probe = probe_machine()
        selection = select_backend(settings.compute_share, probe)
        cores = parse_cores(settings.unit_cores) if settings.unit_cores else None
        share = open_compute_share(
            selection,
            role,
            settings.unit,
            cores or sorted(os.sched_getaffinity(0)),
            probe,
            ShareOptions(
                cgroup_period_us=settings.cgroup_period_us, cgroup_limit=settings.cgroup_limit
            ),
        )
        return cls(share, role, len(cores or os.sched_getaffinity(0)))

    def attach_activity(self, settings: UnitWorkerSettings, region: str) -> None:
        """Side by side with the other worker on the work-conserving cgroup weight, take every
        core of the unit only while the other has no work (compute_share/activity.py)."""
        if settings.mode != "semi-pd" or not region:
            return
        if self.share.name != "cpu-cgroup" or settings.cgroup_limit != "weight":
            return
        self.activity = UnitActivity.open(activity_path(region), self.role, self.cores)

    def set_active(self, active: bool) -> None:
        """Whether this worker has work (a prefill batch in hand, requests decoding)."""
        if self.activity is not None:
            self.activity.set_active(active)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn` on the model thread, after whatever was queued there before it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: self._timed(fn, *args, **kwargs))

    def _timed(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        self._busy_since = time.monotonic()
        if self.activity is not None:
            share = self.applied.requested if self.applied is not None else 0.5
            threads = self.activity.threads(share)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            self._busy_since = None

    def busy_for(self) -> float:
        """Seconds the model call running now has taken (0: none runs)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def own_share(self, prefill_share: float) -> float:
        return prefill_share if self.role == "prefill" else round(1.0 - prefill_share, 6)

    async def apply_split(self, prefill_share: float) -> AppliedShare:
        """This worker's part of a unit split, applied on the model thread between iterations."""
        return await self.apply_own(self.own_share(prefill_share))

    async def apply_own(self, share: float) -> AppliedShare:
        """This worker's own fraction of the device (1.0: all of it)."""
        applied = await self.run(self.share.apply, share)
        self.applied = applied
        logger.info("compute share applied: %s", applied.description)
        return applied

    async def report(self, source: str, prefill_share: float, sequence: int) -> ComputeShareApplied:
        """Apply a split and describe the outcome; a failure leaves the previous share."""
        return await self.report_own(source, self.own_share(prefill_share), sequence)

    async def report_own(self, source: str, own: float, sequence: int) -> ComputeShareApplied:
        try:
            applied = await self.apply_own(own)
        except RestartRequiredError as err:
            logger.info("compute share %.3f needs a new process: %s", own, err)
            self.restart_env = dict(err.env_update)
            given = self.applied.given if self.applied else 1.0
            return ComputeShareApplied(
                source, self.role, self.share.name, sequence, own, given, "", str(err)
            )
        except ComputeShareError as err:
            logger.warning("compute share %.3f refused: %s", own, err)
            given = self.applied.given if self.applied else 1.0
            return ComputeShareApplied(
                source, self.role, self.share.name, sequence, own, given, "", str(err)
            )
        return ComputeShareApplied(
            source,
            self.role,
            applied.backend,
            sequence,
            applied.requested,
            applied.given,
            applied.description,
        )

    def close(self) -> None:
        """Drop queued calls, give the running one CLOSE_GRACE_S to end, release the share.
        A call that does not end is left behind (the process exits without it: lifecycle)."""
        self._thread.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + CLOSE_GRACE_S
        while self._busy_since is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._busy_since is not None:
            logger.error("a model call is still running after %.0fs; leaving it", self.busy_for())
        if self.activity is not None:
            self.activity.close()
        self.share.close()


async def watch_model_thread(compute: WorkerCompute, limit_s: float, poll_s: float = 1.0) -> None:
    """Until cancelled; ModelThreadStuck once a model call has run longer than `limit_s`."""
    while True:
        await asyncio.sleep(poll_s)
        busy = compute.busy_for()
        if busy > limit_s:
            raise ModelThreadStuck(
                f"a model call has run {busy:.0f}s, past DUET_MODEL_CALL_TIMEOUT_S={limit_s:g}"
            )


async def follow_splits(
    bus: Bus, compute: WorkerCompute, settings: UnitWorkerSettings, source: str
) -> None:
    """Apply the configured start-up split, then every split published for the unit, each
    after the model call in hand; every outcome is published for the scheduler."""

    replacing = False

    async def apply(split: SetComputeSplit) -> None:
        applied = await compute.report(source, split.prefill_share, split.sequence)
        await bus.publish(compute_applied_subject(settings.unit), encode(applied))
        if compute.restart_env is not None and split.sequence > 0:
            await _replace_for(split)

    async def _replace_for(split: SetComputeSplit) -> None:
        """The backend moves shares by process (cuda-mps): a replacement with the new share
        takes over from this worker (once: later splits go to the replacement)."""
        nonlocal replacing
        if replacing:
            logger.info("split %d left to the replacement on its way", split.sequence)
            return
        replacing = True
        env = {**(compute.restart_env or {}), "DUET_PREFILL_SHARE": f"{split.prefill_share:g}"}
        # The OpenMP settings the launcher started this one with
        for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            if name in os.environ:
                env[name] = os.environ[name]
        reason = f"split {split.sequence}: prefill share {split.prefill_share:g}"
        answer = await request_replacement(bus, settings.unit, compute.role, source, env, reason)
        if isinstance(answer, ErrorReply):
            logger.warning("no replacement for the new split: %s", answer.message)
            replacing = False

    async def on_split(msg: Msg) -> None:
        try:
            split = decode(msg.data, SetComputeSplit)
        except ProtoError as err:
            logger.warning("ignored a compute split message: %s", err)
            return
        await apply(split)

    if settings.mode == "unified":  # the only worker: the whole device, no split to follow
        whole = await compute.report_own(source, 1.0, 0)
        await bus.publish(compute_applied_subject(settings.unit), encode(whole))
        return
    await apply(SetComputeSplit(settings.prefill_share, 0, "start-up"))
    await bus.subscribe(compute_split_subject(settings.unit), on_split)
