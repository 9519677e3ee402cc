"""The CUDA IPC path: handle encoding and validation, the probe that never crashes, the CPU
fallback, and the runtime calls made (checked against a fake cudart that models only what CUDA
documents). With a usable GPU, the last test shares real device memory between two processes."""

import gc
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import msgpack
import pytest
import torch
from cuda.bindings import runtime as real_cudart
from cuda.pathfinder import DynamicLibNotFoundError

from duetserve.services.kv_manager.cuda_ipc import (
    CudaAvailability,
    DeviceMemory,
    IpcHandle,
    handle_from_bytes,
    handle_to_bytes,
    probe_cuda,
)
from duetserve.services.kv_manager.errors import (
    CudaError,
    CudaUnavailable,
    StorageError,
    WireFormatError,
)
from duetserve.services.kv_manager.layout import StorageLayout
from duetserve.services.kv_manager.shared_memory import SHM_DIR
from duetserve.services.kv_manager.storage import (
    CpuSharedStorage,
    CudaIpcStorage,
    handle_from_wire,
    open_storage,
)
from tests.unit.fake_cudart import Err, FakeCudart

LAYOUT = StorageLayout.pack([("kv_pool", "float32", (2, 8)), ("w", "bfloat16", (4,))])
HERE = probe_cuda()


def ipc_handle(**changes: Any) -> IpcHandle:
    fields = {"handle": bytes(range(64)), "nbytes": LAYOUT.nbytes, "device": 1, "layout": LAYOUT}
    return IpcHandle(**{**fields, **changes})


def test_ipc_handle_round_trips_through_msgpack() -> None:
    handle = ipc_handle()
    wire = msgpack.unpackb(msgpack.packb(handle.to_wire()), raw=False)
    assert isinstance(wire["handle"], bytes)  # bin, not a list of ints
    assert IpcHandle.from_wire(wire) == handle
    assert handle_from_wire(wire) == handle


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("handle", bytes(63), "exactly 64 bytes, got 63"),
        ("handle", bytes(65), "exactly 64 bytes, got 65"),
        ("handle", "ab" * 32, "expected bytes"),
        ("nbytes", 0, "below 1"),
        ("nbytes", 256, "does not fit"),
        ("device", -1, "below 0"),
        ("device", True, "expected an integer"),
        ("version", 2, "version 2 not supported"),
        ("kind", "cpu_shm", "expected kind"),
        ("pid", 5, "unknown field"),
    ],
)
def test_ipc_handle_from_wire_refuses(key: str, value: object, message: str) -> None:
    wire = {**ipc_handle().to_wire(), key: value}
    with pytest.raises(WireFormatError, match=message):
        IpcHandle.from_wire(wire)


def test_ipc_handle_checks_itself_and_unknown_kinds_are_refused() -> None:
    with pytest.raises(StorageError, match="64 bytes"):
        ipc_handle(handle=b"short")
    with pytest.raises(WireFormatError, match="unknown storage kind 'nvshmem'"):
        handle_from_wire({"kind": "nvshmem"})


def test_handle_bytes_survive_the_real_struct() -> None:
    raw = bytes(range(100, 164))
    assert handle_to_bytes(handle_from_bytes(real_cudart, raw)) == raw
    with pytest.raises(StorageError):
        handle_from_bytes(real_cudart, raw[:10])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_probe_here_says_unavailable_with_a_reason() -> None:
    assert HERE.available is False and HERE.reason and HERE.device_count == 0


@pytest.mark.parametrize(
    ("load", "reason"),
    [
        (lambda: (_ for _ in ()).throw(ImportError("no module named cuda")), "ImportError"),
        (
            lambda: (_ for _ in ()).throw(DynamicLibNotFoundError("libcudart.so.13")),
            "DynamicLibNotFoundError: libcudart.so.13",
        ),
        (lambda: FakeCudart(fail={"cudaGetDeviceCount": Err(35)}), "cudaErrorInsufficientDriver"),
        (lambda: FakeCudart(fail={"cudaGetDeviceCount": Err(100)}), "cudaErrorNoDevice"),
        (lambda: FakeCudart(device_count=0), "no CUDA device"),
    ],
)
def test_probe_turns_every_failure_into_a_reason(load: Any, reason: str) -> None:
    availability = probe_cuda(load)
    assert availability.available is False and reason in availability.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_probe_needs_torch_with_cuda_too() -> None:
    availability = probe_cuda(lambda: FakeCudart(device_count=1))
    assert availability.available is False and "torch" in availability.reason


def unavailable() -> CudaAvailability:
    return CudaAvailability(False, "cudaGetDeviceCount failed: cudaErrorNoDevice")


def test_open_storage_falls_back_to_cpu_and_says_why() -> None:
    name = f"duet-test-{uuid.uuid4().hex[:12]}"
    opened = open_storage(LAYOUT, name, "auto", probe=unavailable)
    try:
        assert isinstance(opened.storage, CpuSharedStorage)
        assert "CUDA unavailable (cudaGetDeviceCount failed: cudaErrorNoDevice)" in opened.reason
        assert (SHM_DIR / name).exists()
    finally:
        opened.storage.close()
    assert not (SHM_DIR / name).exists()
    with pytest.raises(CudaUnavailable, match="cudaErrorNoDevice"):
        open_storage(LAYOUT, name, "cuda", probe=unavailable)
    fails = FakeCudart(fail={"cudaMalloc": Err.cudaErrorMemoryAllocation})
    opened = open_storage(LAYOUT, name, probe=lambda: CudaAvailability(True, "1", 1), cudart=fails)
    assert "cudaMalloc failed: cudaErrorMemoryAllocation" in opened.reason
    opened.storage.close()


@pytest.mark.skipif(HERE.available, reason="CUDA is usable here; the fallback is not taken")
def test_open_storage_auto_with_the_real_probe_falls_back() -> None:
    opened = open_storage(LAYOUT, f"duet-test-{uuid.uuid4().hex[:12]}")
    opened.storage.close()
    assert isinstance(opened.storage, CpuSharedStorage) and HERE.reason in opened.reason


def test_allocate_and_export_use_the_base_pointer() -> None:
    fake = FakeCudart()
    memory = DeviceMemory.allocate(fake, 4096, device=1)
    assert [c[0] for c in fake.calls] == [
        "cudaGetDevice",
        "cudaSetDevice",
        "cudaMalloc",
        "cudaMemset",
        "cudaDeviceSynchronize",
        "cudaSetDevice",
    ]
    assert fake.calls[1] == ("cudaSetDevice", 1) and fake.calls[-1] == ("cudaSetDevice", 0)
    assert fake.calls[3] == ("cudaMemset", memory.ptr, 0, 4096)
    raw = memory.export_handle()
    assert ("cudaIpcGetMemHandle", memory.ptr) in fake.calls and len(raw) == 64
    assert memory.cuda_array_interface() == {
        "shape": (4096,),
        "typestr": "|u1",
        "data": (memory.ptr, False),
        "strides": None,
        "stream": None,
        "version": 3,
    }
    ptr = memory.ptr
    del memory
    gc.collect()
    assert fake.calls[-2:] == [("cudaFree", ptr), ("cudaSetDevice", 0)]


def test_open_handle_maps_and_closes_when_dropped() -> None:
    fake = FakeCudart()
    exported = DeviceMemory.allocate(fake, LAYOUT.nbytes, device=0)
    handle = IpcHandle(exported.export_handle(), LAYOUT.nbytes, 0, LAYOUT)
    opened = DeviceMemory.open_handle(fake, IpcHandle.from_wire(handle.to_wire()))
    assert ("cudaIpcOpenMemHandle", handle.handle, 1) in fake.calls  # lazy peer access
    assert fake.opened[opened.ptr] == exported.ptr and opened.opened
    with pytest.raises(StorageError, match="only the process that allocated"):
        opened.export_handle()
    mapped = opened.ptr
    del opened
    gc.collect()
    assert ("cudaIpcCloseMemHandle", mapped) in fake.calls
    assert ("cudaFree", exported.ptr) not in fake.calls


def test_runtime_errors_become_typed_errors_and_restore_the_device() -> None:
    fake = FakeCudart(fail={"cudaMalloc": Err.cudaErrorMemoryAllocation})
    with pytest.raises(CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation") as info:
        DeviceMemory.allocate(fake, 1 << 40, device=1)
    assert (info.value.call, info.value.error_name) == ("cudaMalloc", "cudaErrorMemoryAllocation")
    assert fake.calls[-1] == ("cudaSetDevice", 0) and fake.current == 0
    with pytest.raises(CudaError, match="cudaSetDevice failed: cudaErrorInvalidDevice"):
        DeviceMemory.allocate(FakeCudart(device_count=1), 16, device=3)
    stranger = IpcHandle(b"fake" + bytes(60), LAYOUT.nbytes, 0, LAYOUT)
    with pytest.raises(CudaError, match="cudaIpcOpenMemHandle failed: cudaErrorInvalidResource"):
        DeviceMemory.open_handle(FakeCudart(), stranger)
    fake = FakeCudart(fail={"cudaMemset": Err.cudaErrorInvalidValue})
    with pytest.raises(CudaError, match="cudaMemset"):
        DeviceMemory.allocate(fake, 64, device=0)
    gc.collect()
    assert ("cudaFree", next(iter(fake.allocations))) in fake.calls  # nothing leaked


CHILD_GPU = """
    import sys, msgpack, torch
    from duetserve.services.kv_manager.storage import attach_storage
    mapped = attach_storage(msgpack.unpackb(bytes.fromhex(sys.argv[1])))
    pool = mapped.tensors["kv_pool"]
    assert pool.is_cuda and torch.all(pool == 1.5), pool
    pool[0] = 2.5
    torch.cuda.synchronize()
    mapped.close()
"""


@pytest.mark.skipif(not HERE.available, reason=f"no usable CUDA here: {HERE.reason}")
def test_real_device_memory_is_shared_with_another_process() -> None:
    storage = CudaIpcStorage.create(LAYOUT, device=0)
    pool = storage.tensors["kv_pool"]
    assert pool.is_cuda and torch.all(pool == 0)
    pool.fill_(1.5)
    torch.cuda.synchronize()
    wire = msgpack.packb(storage.handle().to_wire())
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD_GPU), wire.hex()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    assert pool[0].tolist() == [2.5] * 8 and pool[1].tolist() == [1.5] * 8
    storage.close()


def test_host_memory_is_pinned_whole_and_unpinned_once() -> None:
    from duetserve.services.kv_manager.cuda_ipc import PinnedHostMemory

    cudart = FakeCudart()
    pool = torch.zeros(4, 2, 8, 16, dtype=torch.bfloat16)  # as a mapped host tier's KV pool
    pinned = PinnedHostMemory(cudart, pool)
    assert cudart.pinned == {pool.data_ptr(): pool.numel() * 2}
    assert cudart.calls[-1] == ("cudaHostRegister", pool.data_ptr(), pool.numel() * 2, 1)
    pinned.close()
    pinned.close()  # once only
    assert cudart.pinned == {}
    assert [c[0] for c in cudart.calls].count("cudaHostUnregister") == 1
    with pytest.raises(StorageError):  # a strided view is not one range of memory
        PinnedHostMemory(cudart, pool[:, 0])
    again = PinnedHostMemory(cudart, pool)
    with pytest.raises(CudaError, match="cudaHostRegister"):  # already registered
        PinnedHostMemory(cudart, pool)
    del again
    gc.collect()
    assert cudart.pinned == {}  # unpinned when garbage
