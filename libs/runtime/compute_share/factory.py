"""Opening the selected backend for one worker, with the one log line that says which backend
is active and why."""

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from duetserve.runtime.compute_share.affinity import AffinityShare
from duetserve.runtime.compute_share.base import BackendUnavailableError, ComputeShare, Role
from duetserve.runtime.compute_share.cgroup import DEFAULT_PERIOD_US, CgroupCpuShare, CgroupLimit
from duetserve.runtime.compute_share.cuda_green import GreenContextShare
from duetserve.runtime.compute_share.mps import MpsShare
from duetserve.runtime.compute_share.probe import MachineProbe
from duetserve.runtime.compute_share.selection import Selection

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShareOptions:
    """Per-backend settings, parsed at the worker's entrypoint."""

    device_index: int = 0  # cuda-green: the CUDA device this worker runs on
    cgroup_period_us: int = DEFAULT_PERIOD_US  # cpu-cgroup: CFS period (see cgroup.py)
    cgroup_limit: CgroupLimit = "weight"  # cpu-cgroup: work-conserving weights, or quotas
    # cuda-mps: the CUDA_MPS_ACTIVE_THREAD_PERCENTAGE this process was started with
    mps_started_percent: int | None = None


def open_compute_share(
    selection: Selection,
    role: Role,
    unit: str,
    cores: Iterable[int],
    probe: MachineProbe,
    options: ShareOptions = ShareOptions(),
) -> ComputeShare:
    """This worker's share of unit `unit`, whose CPU cores are `cores`. Nothing is limited until
    `apply` is called (except cpu-cgroup, which moves the process into its cgroup here)."""
    share: ComputeShare
    if selection.backend == "cuda-green":
        share = GreenContextShare(role, options.device_index)
    elif selection.backend == "cuda-mps":
        share = MpsShare(role, options.mps_started_percent)
    elif selection.backend == "cpu-cgroup":
        mount = probe.cgroup.mount
        if mount is None:
            raise BackendUnavailableError("cpu-cgroup: the probe found no cpu cgroup")
        share = CgroupCpuShare(
            mount,
            unit,
            role,
            cores,
            period_us=options.cgroup_period_us,
            limit=options.cgroup_limit,
        )
    else:
        share = AffinityShare(role, cores)
    _log.info("%s for %s worker of unit %s", selection.log_line(), role, unit)
    return share
