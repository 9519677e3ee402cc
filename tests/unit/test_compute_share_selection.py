"""Choosing a backend from the machine's facts: the auto order, the reason logged, the clear
error when a requested backend cannot run, and the probe on this machine."""

import logging
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from duetserve.runtime.compute_share.affinity import AffinityShare
from duetserve.runtime.compute_share.base import BackendUnavailableError, InvalidShareError
from duetserve.runtime.compute_share.cgroup_fs import CgroupMount
from duetserve.runtime.compute_share.factory import ShareOptions, open_compute_share
from duetserve.runtime.compute_share.mps import MpsShare, mps_daemon_running
from duetserve.runtime.compute_share.probe import (
    CgroupFacts,
    CudaFacts,
    MachineProbe,
    MpsFacts,
    nvidia_gpu_present,
    probe_cuda,
    probe_machine,
)
from duetserve.runtime.compute_share.selection import Selection, parse_preference, select_backend

MPS_DIR = Path("/tmp/nvidia-mps")
V1 = CgroupMount(1, Path("/sys/fs/cgroup/cpu"))


def gpu_machine() -> MachineProbe:
    """A machine where every backend can run."""
    return MachineProbe(
        cuda=CudaFacts(1, 12080, True, True, "1 device(s), driver CUDA 12.8"),
        mps=MpsFacts(MPS_DIR, daemon=True, nvidia_gpu=True),
        cgroup=CgroupFacts(V1, writable=True),
        cpu_count=16,
    )


def cpu_machine(writable: bool = True) -> MachineProbe:
    return MachineProbe(
        cuda=CudaFacts(0, 0, False, True, "no usable CUDA driver: libcuda not found"),
        mps=MpsFacts(MPS_DIR, daemon=False, nvidia_gpu=False),
        cgroup=CgroupFacts(V1, writable=writable),
        cpu_count=2,
    )


def test_auto_prefers_green_contexts() -> None:
    selection = select_backend("auto", gpu_machine())
    assert selection == Selection(
        "cuda-green", "auto: green contexts on 1 device(s), driver CUDA 12.8"
    )


def test_auto_falls_to_mps_on_an_old_driver_and_says_why() -> None:
    probe = gpu_machine()
    old = replace(probe, cuda=replace(probe.cuda, driver_version=12020))
    selection = select_backend("auto", old)
    assert selection.backend == "cuda-mps"
    assert "skipped cuda-green: driver supports CUDA 12.2, green contexts need 12.4" in (
        selection.reason
    )


def test_auto_on_a_cpu_machine_takes_the_cgroup_then_affinity() -> None:
    selection = select_backend("auto", cpu_machine())
    assert selection.backend == "cpu-cgroup"
    assert selection.reason.startswith("auto: cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    assert "cuda-mps: no NVIDIA GPU" in selection.reason
    fallback = select_backend("auto", cpu_machine(writable=False))
    assert fallback.backend == "cpu-affinity"
    assert "cpu-cgroup: /sys/fs/cgroup/cpu is not writable" in fallback.reason
    assert fallback.log_line().startswith("compute share: cpu-affinity (auto: 2 cores")
    assert "\n" not in fallback.log_line()


@pytest.mark.parametrize(
    ("backend", "probe", "message"),
    [
        (
            "cpu-cgroup",
            cpu_machine(writable=False),
            "cpu-cgroup: /sys/fs/cgroup/cpu is not writable",
        ),
        ("cuda-green", cpu_machine(), "cuda-green: no CUDA device (no usable CUDA driver"),
        ("cuda-mps", cpu_machine(), "cuda-mps: no NVIDIA GPU"),
        (
            "cuda-mps",
            replace(gpu_machine(), mps=MpsFacts(MPS_DIR, daemon=False, nvidia_gpu=True)),
            "cuda-mps: no MPS control daemon at /tmp/nvidia-mps (start nvidia-cuda-mps-control -d)",
        ),
        (
            "cuda-green",
            replace(gpu_machine(), cuda=CudaFacts(1, 12080, False, True, "1 device(s)")),
            "cuda-green: torch is built without CUDA",
        ),
        (
            "cuda-green",
            replace(gpu_machine(), cuda=CudaFacts(1, 12080, True, False, "1 device(s)")),
            "cuda-green: the installed cuda-python has no cuGreenCtxCreate",
        ),
        (
            "cpu-cgroup",
            replace(cpu_machine(), cgroup=CgroupFacts(None, False)),
            "cpu-cgroup: no cgroup hierarchy with the cpu controller is mounted",
        ),
    ],
)
def test_a_requested_backend_that_cannot_run_says_why(
    backend: str, probe: MachineProbe, message: str
) -> None:
    with pytest.raises(BackendUnavailableError) as caught:
        select_backend(backend, probe)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)


def test_a_requested_backend_that_can_run_is_used() -> None:
    assert select_backend("cpu-affinity", gpu_machine()) == Selection(
        "cpu-affinity", "requested; 16 cores, whole cores per worker"
    )
    assert select_backend("cuda-mps", gpu_machine()).backend == "cuda-mps"


def test_parse_preference() -> None:
    assert parse_preference(" Auto ") == "auto"
    assert parse_preference("cpu-cgroup") == "cpu-cgroup"
    with pytest.raises(InvalidShareError, match="must be auto or one of"):
        parse_preference("cgroup")


def test_this_machine_without_a_gpu_refuses_the_gpu_backends() -> None:
    probe = probe_machine()
    if probe.cuda.devices > 0 or probe.mps.nvidia_gpu:
        pytest.skip("this machine has an NVIDIA GPU")
    assert probe.cpu_count >= 1
    with pytest.raises(BackendUnavailableError, match=r"^cuda-green: no CUDA device"):
        select_backend("cuda-green", probe)
    with pytest.raises(BackendUnavailableError, match=r"^cuda-mps: no NVIDIA GPU"):
        select_backend("cuda-mps", probe)
    assert select_backend("auto", probe).backend in ("cpu-cgroup", "cpu-affinity")


def test_probe_without_cuda_python() -> None:
    def missing() -> None:
        raise ImportError("No module named 'cuda'")

    facts = probe_cuda(missing)
    assert (facts.devices, facts.green_api) == (0, False)
    assert "cuda-python is not installed" in facts.detail
    no_green = SimpleNamespace(cuInit=lambda flags: (0,))
    assert probe_cuda(lambda: no_green).green_api is False


def test_the_package_imports_and_probes_without_cuda_python() -> None:
    code = (
        "import sys; sys.modules['cuda'] = None\n"
        "from duetserve.runtime.compute_share import probe_machine, select_backend\n"
        "probe = probe_machine()\n"
        "print(probe.cuda.detail); print(select_backend('auto', probe).backend)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    detail, backend = out.stdout.splitlines()
    assert detail.startswith("cuda-python is not installed")
    assert backend in ("cpu-cgroup", "cpu-affinity")


def test_mps_daemon_is_seen_by_its_control_socket(tmp_path: Path) -> None:
    assert not mps_daemon_running(tmp_path)
    (tmp_path / "control").write_text("")
    assert not mps_daemon_running(tmp_path)  # a plain file is not a daemon
    (tmp_path / "control").unlink()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "control"))
        assert mps_daemon_running(tmp_path)


def test_nvidia_gpu_is_seen_in_the_driver_listing(tmp_path: Path) -> None:
    assert not nvidia_gpu_present(tmp_path)
    (tmp_path / "driver" / "nvidia" / "gpus" / "0000:01:00.0").mkdir(parents=True)
    assert nvidia_gpu_present(tmp_path)


def test_open_logs_one_line_naming_the_backend(caplog: pytest.LogCaptureFixture) -> None:
    selection = Selection("cpu-affinity", "requested; 2 cores, whole cores per worker")
    with caplog.at_level(logging.INFO, logger="duetserve.runtime.compute_share"):
        share = open_compute_share(selection, "decode", "unit0", [0, 1], cpu_machine())
    assert isinstance(share, AffinityShare) and share.in_place
    assert [record.getMessage() for record in caplog.records] == [
        "compute share: cpu-affinity (requested; 2 cores, whole cores per worker) "
        "for decode worker of unit unit0"
    ]
    share.close()
    mps = open_compute_share(
        Selection("cuda-mps", "requested"),
        "prefill",
        "unit0",
        [0],
        gpu_machine(),
        ShareOptions(mps_started_percent=60),
    )
    assert isinstance(mps, MpsShare) and mps.apply(0.6).amount == 60
    with pytest.raises(BackendUnavailableError, match="no cpu cgroup"):
        open_compute_share(
            Selection("cpu-cgroup", "requested"),
            "prefill",
            "unit0",
            [0],
            replace(cpu_machine(), cgroup=CgroupFacts(None, False)),
        )
