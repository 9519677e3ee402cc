"""The `cpu-affinity` backend: each worker is pinned to its own cores and runs as many torch
threads as it has cores. Re-pinned in place.

Coarse by construction: a split moves whole cores. Prefill gets the first k of the unit's cores
and decode the rest, k = round(prefill fraction x cores) kept in [1, cores - 1] so neither side is
left without a core. On 2 cores only one split exists (1 + 1), whatever the share; on 1 core both
workers share it. A share of 1 gives the worker every core (no split).

Linux keeps affinity per thread, and `sched_setaffinity(pid)` moves only the thread whose id is
`pid`. Pinning a process therefore walks /proc/<pid>/task and pins every thread, so the OpenMP
pool torch started earlier moves too; threads created later inherit their creator's cores.
"""

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from duetserve.runtime.compute_share.base import (
    AppliedShare,
    BackendName,
    InvalidShareError,
    Role,
    check_role,
    prefill_fraction,
    round_half_up,
)

SetAffinity = Callable[[int, Iterable[int]], None]
GetAffinity = Callable[[int], set[int]]
SetThreads = Callable[[int], None]


class CoreSplit(NamedTuple):
    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    shared: bool  # True: no split, both workers may use every core

    def cores_for(self, role: Role) -> tuple[int, ...]:
        return self.prefill if role == "prefill" else self.decode


def unit_cores(cores: Iterable[int]) -> tuple[int, ...]:
    """The unit's core ids, sorted and without repeats, so both workers split the same list."""
    ordered = tuple(sorted(set(cores)))
    if not ordered or ordered[0] < 0:
        raise InvalidShareError(f"a unit needs at least one core id >= 0, got {ordered}")
    return ordered


def split_cores(prefill_share: float, cores: Sequence[int]) -> CoreSplit:
    """Prefill's first k cores and decode's rest, for prefill's fraction of the unit in [0, 1]
    (0 or 1: one worker holds the whole unit)."""
    ordered = unit_cores(cores)
    count = len(ordered)
    if count == 1 or prefill_share <= 0.0 or prefill_share >= 1.0:
        return CoreSplit(ordered, ordered, shared=True)
    k = min(max(round_half_up(prefill_share * count), 1), count - 1)
    return CoreSplit(ordered[:k], ordered[k:], shared=False)


def pin_process(
    pid: int,
    cores: Iterable[int],
    proc_root: Path = Path("/proc"),
    set_affinity: SetAffinity = os.sched_setaffinity,
) -> int:
    """Pin every thread of `pid` (its main thread first) to `cores`; the number of threads
    pinned. A thread that exits meanwhile is skipped."""
    mask = set(cores)
    set_affinity(pid, mask)
    pinned = 1
    for entry in sorted((proc_root / str(pid) / "task").iterdir()):
        tid = int(entry.name)
        if tid == pid:
            continue
        try:
            set_affinity(tid, mask)
        except ProcessLookupError:
            continue
        pinned += 1
    return pinned


class AffinityShare:
    """Pins one worker (process `pid`, this one by default) to its cores of the unit and sets
    torch's intra-op threads to match. `close` puts back the cores the process had before."""

    name: BackendName = "cpu-affinity"
    in_place: bool = True

    def __init__(
        self,
        role: Role,
        cores: Iterable[int],
        pid: int | None = None,
        proc_root: Path = Path("/proc"),
        set_affinity: SetAffinity = os.sched_setaffinity,
        get_affinity: GetAffinity = os.sched_getaffinity,
        set_threads: SetThreads | None = torch.set_num_threads,
    ) -> None:
        self.role = check_role(role)
        self.cores = unit_cores(cores)
        self.pid = os.getpid() if pid is None else pid
        self._proc_root = proc_root
        self._set_affinity = set_affinity
        self._set_threads = set_threads
        self._original = get_affinity(self.pid)
        self._closed = False

    def apply(self, share: float) -> AppliedShare:
        if self._closed:
            raise InvalidShareError("cpu-affinity: apply after close")
        split = split_cores(prefill_fraction(self.role, share), self.cores)
        mine = split.cores_for(self.role)
        pin_process(self.pid, mine, self._proc_root, self._set_affinity)
        if self._set_threads is not None:
            self._set_threads(len(mine))
        note = " (too few cores to split: shared)" if split.shared and share < 1.0 else ""
        return AppliedShare(
            backend=self.name,
            role=self.role,
            requested=share,
            given=len(mine) / len(self.cores),
            amount=len(mine),
            unit="cores",
            description=f"{self.role} on cores {list(mine)} of {list(self.cores)}, "
            f"{len(mine)} torch threads{note}",
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A process that is gone has nothing to give back.
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            pin_process(self.pid, self._original, self._proc_root, self._set_affinity)
