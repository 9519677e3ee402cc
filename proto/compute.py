"""The compute split of one unit: how much of the device its prefill and decode workers get.

The scheduler's partition controller (or an operator) publishes a `SetComputeSplit`; both
workers of the unit apply their part between two iterations (prefill `prefill_share`, decode
`1 - prefill_share`) and each publishes what it actually got, rounded to its backend's
granularity (cores, quota, SMs, percent), as `ComputeShareApplied`.

A backend that cannot change a running process's share (cuda-mps) moves the split by replacing
the worker: the worker asks the unit's kv_manager to start a replacement (`ReplaceWorker`) with
the new share in its environment. The replacement maps the same storage (no reload) and, once
it serves, says so (`HandOverReady`); the old worker then stops taking work, finishes the
iteration in hand, hands its resident requests to the new one and exits. An operator can
replace a worker the same way (a rolling restart).
"""

import math
from dataclasses import dataclass

from duetserve.proto.codec import message
from duetserve.proto.subjects import ROOT, check_token


def compute_split_subject(unit: str) -> str:
    """Publish: scheduler (or an operator) -> both workers of the unit."""
    return f"{ROOT}.compute.{check_token(unit, 'unit')}.split"


def compute_applied_subject(unit: str) -> str:
    """Publish: each worker of the unit -> scheduler, after applying a split (and at start)."""
    return f"{ROOT}.compute.{check_token(unit, 'unit')}.applied"


def replace_worker_subject(unit: str) -> str:
    """Request/reply: a worker (or an operator) -> the unit's kv_manager."""
    return f"{ROOT}.compute.{check_token(unit, 'unit')}.replace"


def handover_subject(unit: str) -> str:
    """Publish: a replacement worker -> the worker it replaces, once it serves (HandOverReady);
    the old worker, once it has handed over (HandedOver)."""
    return f"{ROOT}.compute.{check_token(unit, 'unit')}.handover"


# What a replacement may be started with beyond the unit's own environment: its share and
# threads, nothing that could change what it runs (the bus is not a shell).
REPLACEMENT_ENV = frozenset(
    {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "DUET_PREFILL_SHARE", "OMP_NUM_THREADS"}
)
WORKER_ROLES = frozenset({"prefill", "decode"})


@message("compute.replace")
@dataclass(frozen=True, slots=True)
class ReplaceWorker:
    role: str  # prefill | decode
    replaces: str  # the instance to hand over from
    env: dict[str, str]  # only REPLACEMENT_ENV keys
    reason: str = ""

    def __post_init__(self) -> None:
        if self.role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {sorted(WORKER_ROLES)}, got {self.role!r}")
        unknown = set(self.env) - REPLACEMENT_ENV
        if unknown:
            raise ValueError(f"a replacement cannot be started with {sorted(unknown)}")


@message("compute.replacing")
@dataclass(frozen=True, slots=True)
class ReplacementStarted:
    role: str
    replaces: str
    pid: int


@message("compute.handover_ready")
@dataclass(frozen=True, slots=True)
class HandOverReady:
    replaces: str  # the old worker's instance
    instance: str  # the replacement, which serves now


@message("compute.handed_over")
@dataclass(frozen=True, slots=True)
class HandedOver:
    """The old worker, after its hand-over, just before it exits (for operators and the
    switch benchmark)."""

    instance: str  # the old worker
    to: str  # the replacement
    handed_over: int  # resident requests the replacement took
    preempted: int  # requests it refused, sent back to the scheduler (recomputed)
    seconds: float  # from the replacement's announcement to the end of the hand-over


@message("compute.set_split")
@dataclass(frozen=True, slots=True)
class SetComputeSplit:
    prefill_share: float  # of the device, in (0, 1); decode gets the rest
    sequence: int  # increases with every split the sender publishes; workers echo it
    reason: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.prefill_share) or not 0.0 < self.prefill_share < 1.0:
            raise ValueError(f"prefill_share must be in (0, 1), got {self.prefill_share!r}")


@message("compute.applied")
@dataclass(frozen=True, slots=True)
class ComputeShareApplied:
    source: str  # the worker instance
    role: str  # prefill | decode
    backend: str  # cpu-cgroup, cpu-affinity, cuda-green, cuda-mps
    sequence: int  # the SetComputeSplit this answers (0: the start-up split)
    requested: float  # the worker's own fraction of the device, as asked
    given: float  # after rounding to the backend's granularity
    description: str
    error: str | None = None  # the split could not be applied; the previous one holds
