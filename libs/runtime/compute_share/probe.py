"""Facts about this machine that decide which compute-share backend can run, gathered once at
start-up by `probe_machine` so that choosing a backend (selection.py) is a pure function.

Probing CUDA calls cuInit in this process; a process that forks children after it must start
them with `spawn` (CUDA does not survive fork).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from duetserve.runtime.compute_share.cgroup_fs import (
    CgroupMount,
    cgroup_writable,
    detect_cpu_cgroup,
)
from duetserve.runtime.compute_share.cuda_green import Driver, checked, import_driver
from duetserve.runtime.compute_share.mps import DEFAULT_PIPE_DIR, mps_daemon_running


@dataclass(frozen=True, slots=True)
class CudaFacts:
    devices: int  # CUDA devices the driver reports; 0 without a driver
    driver_version: int  # 1000 x major + 10 x minor (12040 is CUDA 12.4); 0 when unknown
    torch_cuda: bool  # torch is built with CUDA and sees a device
    green_api: bool  # the installed cuda-python has cuGreenCtxCreate
    detail: str  # what was found, or why CUDA cannot be used


@dataclass(frozen=True, slots=True)
class MpsFacts:
    pipe_dir: Path
    daemon: bool  # an MPS control daemon listens in pipe_dir
    nvidia_gpu: bool  # the NVIDIA kernel driver lists a GPU


@dataclass(frozen=True, slots=True)
class CgroupFacts:
    mount: CgroupMount | None  # the hierarchy with the cpu controller, if any
    writable: bool  # this process may create cgroups in it


@dataclass(frozen=True, slots=True)
class MachineProbe:
    cuda: CudaFacts
    mps: MpsFacts
    cgroup: CgroupFacts
    cpu_count: int  # cores this process may run on


def probe_cuda(load_driver: Callable[[], Driver] = import_driver) -> CudaFacts:
    """What the CUDA driver reports. Never raises: a missing cuda-python, a missing libcuda or
    no device all come back as devices=0 with the reason in `detail`."""
    try:
        driver = load_driver()
    except ImportError as err:
        return CudaFacts(0, 0, False, False, f"cuda-python is not installed ({err})")
    green_api = hasattr(driver, "cuGreenCtxCreate")
    try:
        (version,) = checked("cuDriverGetVersion", driver.cuDriverGetVersion())
        checked("cuInit", driver.cuInit(0))
        (count,) = checked("cuDeviceGetCount", driver.cuDeviceGetCount())
    except Exception as err:  # DynamicLibNotFoundError without a driver, CudaCallError, ...
        return CudaFacts(0, 0, False, green_api, f"no usable CUDA driver: {err}")
    torch_cuda = torch.version.cuda is not None and torch.cuda.is_available()
    version = int(version)
    detail = f"{int(count)} device(s), driver CUDA {version // 1000}.{version % 1000 // 10}"
    return CudaFacts(int(count), version, torch_cuda, green_api, detail)


def nvidia_gpu_present(proc_root: Path = Path("/proc")) -> bool:
    """Whether the NVIDIA kernel driver lists a GPU (no CUDA call needed)."""
    try:
        return any((proc_root / "driver" / "nvidia" / "gpus").iterdir())
    except OSError:
        return False


def probe_cgroup(proc_root: Path = Path("/proc")) -> CgroupFacts:
    mount = detect_cpu_cgroup(proc_root)
    return CgroupFacts(mount, mount is not None and cgroup_writable(mount))


def probe_machine(
    mps_pipe_dir: Path = DEFAULT_PIPE_DIR,
    proc_root: Path = Path("/proc"),
    load_driver: Callable[[], Driver] = import_driver,
) -> MachineProbe:
    """Everything selection needs. `mps_pipe_dir` comes from the caller's settings (see
    mps.mps_pipe_dir for reading it from an environment)."""
    return MachineProbe(
        cuda=probe_cuda(load_driver),
        mps=MpsFacts(mps_pipe_dir, mps_daemon_running(mps_pipe_dir), nvidia_gpu_present(proc_root)),
        cgroup=probe_cgroup(proc_root),
        cpu_count=len(os.sched_getaffinity(0)),
    )
