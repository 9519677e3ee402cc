"""The compute split of one unit: how much of the device its prefill and decode workers get.

The scheduler's partition controller (or an operator) publishes a `SetComputeSplit`; both
workers of the unit apply their part between two iterations (prefill `prefill_share`, decode
`1 - prefill_share`) and each publishes what it actually got, rounded to its backend's
granularity (cores, quota, SMs, percent), as `ComputeShareApplied`.
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
