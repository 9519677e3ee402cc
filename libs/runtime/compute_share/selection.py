"""Which compute-share backend runs: the requested one, or under `auto` the first available of
cuda-green, cuda-mps, cpu-cgroup, cpu-affinity. Pure: it reads a MachineProbe and nothing else.

A requested backend that cannot run is an error that says why, never a silent fallback.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from duetserve.runtime.compute_share.base import (
    BACKENDS,
    BackendName,
    BackendPreference,
    BackendUnavailableError,
    InvalidShareError,
)
from duetserve.runtime.compute_share.probe import MachineProbe

MIN_GREEN_DRIVER = 12040  # green contexts arrived in the CUDA 12.4 driver API


class Availability(NamedTuple):
    available: bool
    reason: str  # why it can run (what it will use), or why not


@dataclass(frozen=True, slots=True)
class Selection:
    backend: BackendName
    reason: str

    def log_line(self) -> str:
        return f"compute share: {self.backend} ({self.reason})"


def _version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _cuda_green(probe: MachineProbe) -> Availability:
    cuda = probe.cuda
    if cuda.devices < 1:
        return Availability(False, f"no CUDA device ({cuda.detail})")
    if not cuda.torch_cuda:
        return Availability(False, "torch is built without CUDA or sees no device")
    if not cuda.green_api:
        return Availability(False, "the installed cuda-python has no cuGreenCtxCreate")
    if cuda.driver_version < MIN_GREEN_DRIVER:
        return Availability(
            False, f"driver supports CUDA {_version(cuda.driver_version)}, green contexts need 12.4"
        )
    return Availability(True, f"green contexts on {cuda.detail}")


def _cuda_mps(probe: MachineProbe) -> Availability:
    mps = probe.mps
    if not mps.nvidia_gpu:
        return Availability(False, "no NVIDIA GPU (/proc/driver/nvidia/gpus lists none)")
    if not mps.daemon:
        return Availability(
            False,
            f"no MPS control daemon at {mps.pipe_dir} (start nvidia-cuda-mps-control -d)",
        )
    return Availability(True, f"MPS control daemon at {mps.pipe_dir}")


def _cpu_cgroup(probe: MachineProbe) -> Availability:
    mount = probe.cgroup.mount
    if mount is None:
        return Availability(False, "no cgroup hierarchy with the cpu controller is mounted")
    if not probe.cgroup.writable:
        return Availability(False, f"{mount.path} is not writable")
    return Availability(
        True, f"cgroup v{mount.version} cpu controller at {mount.path}, {probe.cpu_count} cores"
    )


def _cpu_affinity(probe: MachineProbe) -> Availability:
    return Availability(True, f"{probe.cpu_count} cores, whole cores per worker")


_CHECKS: dict[BackendName, Callable[[MachineProbe], Availability]] = {
    "cuda-green": _cuda_green,
    "cuda-mps": _cuda_mps,
    "cpu-cgroup": _cpu_cgroup,
    "cpu-affinity": _cpu_affinity,
}


def availability(backend: BackendName, probe: MachineProbe) -> Availability:
    return _CHECKS[backend](probe)


def parse_preference(text: str) -> BackendPreference:
    """A setting's value as a backend preference: `auto` or one of the backend names."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    for backend in BACKENDS:
        if value == backend:
            return backend
    raise InvalidShareError(
        f"compute share backend must be auto or one of {BACKENDS}, not {text!r}"
    )


def select_backend(preferred: BackendPreference, probe: MachineProbe) -> Selection:
    """The backend to run and the reason, as one log line's worth of text."""
    if preferred != "auto":
        found = availability(preferred, probe)
        if not found.available:
            raise BackendUnavailableError(f"{preferred}: {found.reason}")
        return Selection(preferred, f"requested; {found.reason}")
    skipped: list[str] = []
    for backend in BACKENDS:
        found = availability(backend, probe)
        if found.available:
            passed = f"; skipped {', '.join(skipped)}" if skipped else ""
            return Selection(backend, f"auto: {found.reason}{passed}")
        skipped.append(f"{backend}: {found.reason}")
    raise AssertionError("cpu-affinity is always available")
