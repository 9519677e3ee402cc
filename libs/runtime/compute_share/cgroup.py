"""The `cpu-cgroup` backend: each worker runs in its own cgroup, <mount>/duet/<unit>/<role>,
and its share is that cgroup's part of the unit's cores. Changed in place, fine-grained. Two
ways to hold a worker to its share (`limit`):

- `weight` (the default), work-conserving: the share is a CPU weight (v1 `cpu.shares`, v2
  `cpu.weight`), no quota. CFS divides the cores by weight only while both workers want them:
  an idle decode worker's cores go to prefill and the reverse, as semi-PD's own code
  oversubscribes the GPU (prefill 80% + decode 100% of the SMs) so that no share is lost.
  Each worker runs a torch thread per core, to use the whole unit when the other is idle.
- `quota`: a CPU bandwidth quota of share x cores per period; a hard cap, idle time of the
  other worker is lost (see "The period" below).

The weights: share x 2048 in v1 (so half the unit is the kernel's default 1024), share x 200 in
v2 (half is its default 100), within each version's bounds. These divide the unit between its
workers. The unit's own cgroup (and `duet` above it) weighs as many ordinary threads as it has
cores (the machine's cores, for `duet`): with the kernel's default weight there, the whole
unit, two workers of a torch thread per core each, weighed as much as ONE thread of any other
process, and every thread of the front end (ingress, NATS, the scheduler, a load client) that
woke took half a core from the model while it ran.

cgroup v1 takes `cpu.cfs_period_us` and `cpu.cfs_quota_us`; cgroup v2 takes `cpu.max`
("<quota> <period>") and needs `+cpu` in every ancestor's `cgroup.subtree_control` (the root's
included: that enables the controller for all top-level cgroups, as systemd usually has).

The worker is also pinned to the unit's cores (all of them, both workers alike) so its threads
stay where its share is counted; under a quota torch gets ceil(share x cores) threads: a quota of
1.5 cores needs 2 threads to be used at all.

The period (quota only). The kernel default, 100 ms, is the default here too. CFS bandwidth
control throttles a cgroup that spent its quota until the period ends, so a worker with 0.8 of 2
cores that bursts on both cores uses its 160 ms in 80 ms and then waits 20 ms: a stall of up to
(1 - quota/cores) x period, which a decode step feels. A shorter period, e.g. LATENCY_PERIOD_US =
20 ms, bounds the stall at the cost of more frequent throttling checks; the kernel refuses quotas
below 1 ms, so a short period also raises the smallest share that can be honoured exactly.
"""

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from duetserve.runtime.compute_share.affinity import (
    GetAffinity,
    SetAffinity,
    SetThreads,
    pin_process,
    unit_cores,
)
from duetserve.runtime.compute_share.base import (
    AppliedShare,
    BackendName,
    ComputeShareError,
    InvalidShareError,
    Role,
    check_role,
    check_share,
    round_half_up,
    threads_for,
)
from duetserve.runtime.compute_share.cgroup_fs import (
    CgroupFs,
    CgroupMount,
    CgroupVersion,
    cgroup_of,
)

DEFAULT_PERIOD_US = 100_000
LATENCY_PERIOD_US = 20_000
MIN_PERIOD_US = 1_000
MAX_PERIOD_US = 1_000_000
MIN_QUOTA_US = 1_000
CgroupLimit = Literal["weight", "quota"]
# v1 cpu.shares and v2 cpu.weight: per unit of share, and bounds
WEIGHT_SCALE = {1: 2048, 2: 200}
THREAD_WEIGHT = {1: 1024, 2: 100}  # an ordinary (nice 0) thread's, the kernel's default
WEIGHT_BOUNDS = {1: (2, 262_144), 2: (1, 10_000)}
_UNIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_log = logging.getLogger(__name__)


class CpuQuota(NamedTuple):
    quota_us: int | None  # None: unlimited (v1 -1, v2 "max")
    period_us: int

    @property
    def cores(self) -> float | None:
        return None if self.quota_us is None else self.quota_us / self.period_us


def check_period(period_us: int) -> int:
    if not MIN_PERIOD_US <= period_us <= MAX_PERIOD_US:
        raise InvalidShareError(
            f"a CFS period is {MIN_PERIOD_US}..{MAX_PERIOD_US} us, got {period_us}"
        )
    return period_us


def cpu_quota(share: float, cores: int, period_us: int = DEFAULT_PERIOD_US) -> CpuQuota:
    """share x cores of CPU time per period, at least the kernel's 1 ms minimum."""
    check_share(share)
    check_period(period_us)
    if cores < 1:
        raise InvalidShareError(f"a unit has at least one core, got {cores}")
    return CpuQuota(max(MIN_QUOTA_US, round_half_up(share * cores * period_us)), period_us)


def quota_files(version: CgroupVersion, quota: CpuQuota) -> list[tuple[str, str]]:
    """(control file, text) pairs to write, in order."""
    if version == 1:
        limit = -1 if quota.quota_us is None else quota.quota_us
        return [("cpu.cfs_period_us", str(quota.period_us)), ("cpu.cfs_quota_us", str(limit))]
    limit_text = "max" if quota.quota_us is None else str(quota.quota_us)
    return [("cpu.max", f"{limit_text} {quota.period_us}")]


def weight_file(version: CgroupVersion, share: float) -> tuple[str, str]:
    """The (control file, text) of a CPU weight for `share` of the unit."""
    check_share(share)
    low, high = WEIGHT_BOUNDS[version]
    weight = min(max(round_half_up(share * WEIGHT_SCALE[version]), low), high)
    return ("cpu.shares" if version == 1 else "cpu.weight", str(weight))


def group_weight_file(version: CgroupVersion, threads: int) -> tuple[str, str]:
    """The (control file, text) of a cgroup weighing as much as `threads` ordinary threads."""
    low, high = WEIGHT_BOUNDS[version]
    weight = min(max(THREAD_WEIGHT[version] * threads, low), high)
    return ("cpu.shares" if version == 1 else "cpu.weight", str(weight))


def read_quota(fs: CgroupFs, path: Path, version: CgroupVersion) -> CpuQuota:
    """The quota the cgroup at `path` has now."""
    if version == 1:
        period = int(fs.read(path / "cpu.cfs_period_us"))
        quota = int(fs.read(path / "cpu.cfs_quota_us"))
        return CpuQuota(None if quota < 0 else quota, period)
    limit, period_text = fs.read(path / "cpu.max").split()
    return CpuQuota(None if limit == "max" else int(limit), int(period_text))


def check_unit_name(unit: str) -> str:
    if not _UNIT_NAME.fullmatch(unit):
        raise InvalidShareError(f"a unit name is letters, digits, '_', '.', '-'; got {unit!r}")
    return unit


class CgroupCpuShare:
    """One worker's cgroup. Opening creates it and moves process `pid` (this one by default)
    into it; `apply` sets the quota; `close` moves the process back to the cgroup it came from
    and removes the cgroup (and the unit's and duet's directories once they are empty)."""

    name: BackendName = "cpu-cgroup"
    in_place: bool = True

    def __init__(
        self,
        mount: CgroupMount,
        unit: str,
        role: Role,
        cores: Iterable[int],
        *,
        pid: int | None = None,
        period_us: int = DEFAULT_PERIOD_US,
        limit: CgroupLimit = "weight",
        fs: CgroupFs | None = None,
        proc_root: Path = Path("/proc"),
        set_affinity: SetAffinity = os.sched_setaffinity,
        get_affinity: GetAffinity = os.sched_getaffinity,
        set_threads: SetThreads | None = torch.set_num_threads,
        machine_cores: int | None = None,
    ) -> None:
        """`machine_cores`: the cores of the machine (default: os.cpu_count()), which `duet`'s
        cgroup, holding every unit, weighs as."""
        self.role = check_role(role)
        self.mount = mount
        self.cores = unit_cores(cores)
        self.pid = os.getpid() if pid is None else pid
        self.period_us = check_period(period_us)
        if limit not in ("weight", "quota"):
            raise InvalidShareError(f"cpu-cgroup: limit is weight or quota, not {limit!r}")
        self.limit = limit
        self.path = mount.path / "duet" / check_unit_name(unit) / role
        self._fs = fs or CgroupFs()
        self._proc_root = proc_root
        self._set_affinity = set_affinity
        self._set_threads = set_threads
        home = cgroup_of((proc_root / str(self.pid) / "cgroup").read_text(), mount.version)
        self._home = mount.path / home.lstrip("/")
        self._original_cores = get_affinity(self.pid)
        self._closed = False
        self._machine_cores = machine_cores or os.cpu_count() or len(self.cores)
        self._create()
        try:
            self._write(self.path / "cgroup.procs", str(self.pid))
            pin_process(self.pid, self.cores, proc_root, set_affinity)
        except BaseException:
            self._remove_groups()
            raise

    def apply(self, share: float) -> AppliedShare:
        if self._closed:
            raise InvalidShareError("cpu-cgroup: apply after close")
        if self.limit == "weight":
            return self._apply_weight(share)
        quota = cpu_quota(share, len(self.cores), self.period_us)
        for name, text in quota_files(self.mount.version, quota):
            self._write(self.path / name, text)
        threads = threads_for(share, len(self.cores))
        if self._set_threads is not None:
            self._set_threads(threads)
        cores = quota.cores or float(len(self.cores))
        return AppliedShare(
            backend=self.name,
            role=self.role,
            requested=share,
            given=cores / len(self.cores),
            amount=threads,
            unit="threads",
            description=f"{self.role}: {cores:.3g} of {len(self.cores)} cores "
            f"({quota.quota_us} us per {quota.period_us} us in cgroup v{self.mount.version} "
            f"{self.path}), {threads} torch threads",
        )

    def _apply_weight(self, share: float) -> AppliedShare:
        """A weight, no quota, a thread per core: the share holds only under contention."""
        control, weight = weight_file(self.mount.version, share)
        unlimited = CpuQuota(None, self.period_us)
        for name, text in [*quota_files(self.mount.version, unlimited), (control, weight)]:
            self._write(self.path / name, text)
        threads = len(self.cores)
        if self._set_threads is not None:
            self._set_threads(threads)
        return AppliedShare(
            backend=self.name,
            role=self.role,
            requested=share,
            given=share,
            amount=threads,
            unit="threads",
            description=f"{self.role}: {control} {weight} in cgroup v{self.mount.version} "
            f"{self.path} ({share:.3g} of {len(self.cores)} cores while both workers are busy, "
            f"all of them while the other is idle), {threads} torch threads",
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._fs.write(self._home / "cgroup.procs", str(self.pid))
        except ProcessLookupError:
            pass  # the process has exited: its cgroup is empty already
        except OSError as err:  # removing the cgroup below will fail and say so too
            _log.warning("cpu-cgroup: could not move %d back to %s: %s", self.pid, self._home, err)
        self._remove_groups()
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            pin_process(self.pid, self._original_cores, self._proc_root, self._set_affinity)

    def _create(self) -> None:
        parent = self.mount.path
        for level in (self.path.parent.parent, self.path.parent, self.path):
            if self.mount.version == 2:
                self._write(parent / "cgroup.subtree_control", "+cpu")
            try:
                self._fs.make(level)
            except OSError as err:
                raise ComputeShareError(f"cpu-cgroup: cannot create {level}: {err}") from err
            parent = level
        unit, duet = self.path.parent, self.path.parent.parent
        for level, threads in ((duet, self._machine_cores), (unit, len(self.cores))):
            control, weight = group_weight_file(self.mount.version, threads)
            self._write(level / control, weight)

    def _remove_groups(self) -> None:
        """Remove this worker's cgroup, then its parents while they are empty."""
        for level in (self.path, self.path.parent, self.path.parent.parent):
            try:
                self._fs.remove(level)
            except FileNotFoundError:
                continue
            except OSError as err:
                # A parent still holding the other worker's cgroup is expected; anything else
                # leaves a cgroup behind and is worth a line in the log.
                if level == self.path or err.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    _log.warning("cpu-cgroup: could not remove %s: %s", level, err)
                return

    def _write(self, path: Path, text: str) -> None:
        try:
            self._fs.write(path, text)
        except OSError as err:
            raise ComputeShareError(f"cpu-cgroup: writing {text!r} to {path}: {err}") from err
