"""How many SMs each worker gets from a green-context split: pure arithmetic, no CUDA.

A split is cuDevSmResourceSplitByCount(1 group, device SMs, minCount = prefill's SMs): prefill
takes the group and decode takes the remainder, so both workers derive the same boundary from
prefill's fraction and the two sets do not overlap. The driver rounds a group up to the device's
granularity, which the SM resource reports (`minSmPartitionSize`, `smCoscheduledAlignment`);
planning with counts that already satisfy it makes the split exactly what was planned.
"""

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from duetserve.runtime.compute_share.base import InvalidShareError, Role, round_half_up


@dataclass(frozen=True, slots=True)
class SmLayout:
    """A device's SMs and the rules a split group follows."""

    total: int  # SMs of the device
    min_partition: int  # fewest SMs a group may have
    alignment: int  # a group's SM count is a multiple of this

    def __post_init__(self) -> None:
        if self.total < 1 or self.min_partition < 1 or self.alignment < 1:
            raise InvalidShareError(f"an SM layout needs positive counts, got {self}")


class SmSplit(NamedTuple):
    prefill_sms: int
    decode_sms: int
    split: bool  # False: no split (share 1, or too few SMs); each worker has the whole device

    def sms_for(self, role: Role) -> int:
        return self.prefill_sms if role == "prefill" else self.decode_sms


def documented_layout(total: int, compute_capability_major: int) -> SmLayout:
    """The split rules for drivers whose SM resource does not report them. From cuda.h of CUDA
    12.x (cuDevSmResourceSplitByCount): 6.X at least 1 SM; 7.X at least 2, multiple of 2; 8.X at
    least 4, multiple of 2; 9.0 and newer at least 8, multiple of 8."""
    major = compute_capability_major
    if major >= 9:
        return SmLayout(total, 8, 8)
    if major == 8:
        return SmLayout(total, 4, 2)
    if major == 7:
        return SmLayout(total, 2, 2)
    return SmLayout(total, 1, 1)


def layout_from_resource(sm: Any, compute_capability_major: int) -> SmLayout:
    """The layout of a CUdevSmResource (`resource.sm`): its own minimum and alignment when the
    driver reports them (CUDA 12.5+/13), the documented ones for its architecture otherwise."""
    total = int(sm.smCount)
    documented = documented_layout(total, compute_capability_major)
    minimum = int(getattr(sm, "minSmPartitionSize", 0) or 0)
    alignment = int(getattr(sm, "smCoscheduledAlignment", 0) or 0)
    return SmLayout(
        total,
        minimum if minimum > 0 else documented.min_partition,
        alignment if alignment > 0 else documented.alignment,
    )


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def _round_down(value: int, multiple: int) -> int:
    return (value // multiple) * multiple


def plan_sm_split(prefill_share: float, layout: SmLayout) -> SmSplit:
    """Prefill's SMs (nearest multiple of the alignment, at least the minimum partition) and
    decode's remainder (kept at least a minimum partition too), for prefill's fraction in [0, 1].
    Fraction 0 or 1, or a device too small for two partitions: no split."""
    whole = SmSplit(layout.total, layout.total, split=False)
    if prefill_share <= 0.0 or prefill_share >= 1.0:
        return whole
    step = layout.alignment
    lowest = _round_up(layout.min_partition, step)
    highest = _round_down(layout.total - layout.min_partition, step)
    if highest < lowest:
        return whole
    wanted = round_half_up(prefill_share * layout.total / step) * step
    prefill = min(max(wanted, lowest), highest)
    return SmSplit(prefill, layout.total - prefill, split=True)
