"""Compute partitioning: each worker's part of the device (DESIGN.md, "Computation
partitioning"). Four backends, chosen once at start-up from what the machine has:

- cuda-green: an in-process SM split with CUDA green contexts, changed in place;
- cuda-mps: an MPS active-thread percentage, fixed for a process's life (a new worker per split);
- cpu-cgroup: a cgroup CPU quota (v1 or v2), changed in place, fine-grained;
- cpu-affinity: whole cores plus torch threads, re-pinned in place, coarse; the fallback.

Start-up: `probe_machine()` -> `select_backend(preference, probe)` -> `open_compute_share(...)`,
then `apply(share)` whenever the scheduler moves the split, and `close()` at the end.
Nothing here imports cuda-python until a GPU backend is opened or probed.
"""

from duetserve.runtime.compute_share.affinity import AffinityShare, CoreSplit, split_cores
from duetserve.runtime.compute_share.base import (
    BACKENDS,
    AppliedShare,
    BackendName,
    BackendPreference,
    BackendUnavailableError,
    ComputeShare,
    ComputeShareError,
    CudaCallError,
    InvalidShareError,
    RestartRequiredError,
    Role,
)
from duetserve.runtime.compute_share.cgroup import (
    DEFAULT_PERIOD_US,
    LATENCY_PERIOD_US,
    CgroupCpuShare,
    CpuQuota,
    cpu_quota,
)
from duetserve.runtime.compute_share.cgroup_fs import CgroupMount
from duetserve.runtime.compute_share.cuda_green import GreenContextShare
from duetserve.runtime.compute_share.factory import ShareOptions, open_compute_share
from duetserve.runtime.compute_share.mps import MpsShare, mps_child_env, mps_percent
from duetserve.runtime.compute_share.probe import MachineProbe, probe_machine
from duetserve.runtime.compute_share.selection import Selection, parse_preference, select_backend
from duetserve.runtime.compute_share.sm_split import SmLayout, SmSplit, plan_sm_split

__all__ = [
    "BACKENDS",
    "DEFAULT_PERIOD_US",
    "LATENCY_PERIOD_US",
    "AffinityShare",
    "AppliedShare",
    "BackendName",
    "BackendPreference",
    "BackendUnavailableError",
    "CgroupCpuShare",
    "CgroupMount",
    "ComputeShare",
    "ComputeShareError",
    "CoreSplit",
    "CpuQuota",
    "CudaCallError",
    "GreenContextShare",
    "InvalidShareError",
    "MachineProbe",
    "MpsShare",
    "RestartRequiredError",
    "Role",
    "Selection",
    "ShareOptions",
    "SmLayout",
    "SmSplit",
    "cpu_quota",
    "mps_child_env",
    "mps_percent",
    "open_compute_share",
    "parse_preference",
    "plan_sm_split",
    "probe_machine",
    "select_backend",
    "split_cores",
]
