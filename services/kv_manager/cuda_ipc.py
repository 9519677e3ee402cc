"""CUDA IPC through cuda-python's runtime bindings: one cudaMalloc allocation in kv_manager,
exported as a 64-byte handle (cudaIpcGetMemHandle on its base pointer), opened in each worker with
cudaIpcOpenMemHandle, and seen by torch as a uint8 tensor over the same device memory (via
__cuda_array_interface__: no copy, and torch's caching allocator never owns or sub-allocates it).

Every runtime call's cudaError_t is checked; a failure is a CudaError naming the call and the
error. The bindings module is a parameter (`cudart`) so tests can inject a fake.

Lifetime. A DeviceMemory frees itself (cudaFree, or cudaIpcCloseMemHandle for an opened handle)
when it is garbage: its tensors hold it alive, so device memory never disappears under a view.
Workers must drop their mappings before kv_manager frees the allocation (CUDA's rule).

In cuda-python 13 `cudaIpcMemHandle_t` exposes no `reserved` field, so the 64 bytes are read and
written through the struct's address (`getPtr()`).
"""

import ctypes
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from duetserve.services.kv_manager.errors import (
    CudaError,
    LayoutError,
    StorageError,
    WireFormatError,
)
from duetserve.services.kv_manager.layout import StorageLayout, check_fits
from duetserve.services.kv_manager.wire import (
    refuse_unknown,
    require_bytes,
    require_field,
    require_int,
    require_kind,
    require_map,
)

IPC_HANDLE_BYTES = 64
_log = logging.getLogger(__name__)
Cudart = Any  # cuda.bindings.runtime, or a stand-in with the same functions


@dataclass(frozen=True, slots=True)
class IpcHandle:
    """What a worker needs to map a CUDA storage: the exported handle, the allocation's size,
    the device it lives on, and the tensors packed in it."""

    KIND: ClassVar[str] = "cuda_ipc"
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"kind", "version", "handle", "nbytes", "device", "layout"}
    )

    handle: bytes
    nbytes: int
    device: int
    layout: StorageLayout

    def __post_init__(self) -> None:
        if len(self.handle) != IPC_HANDLE_BYTES:
            raise StorageError(
                f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(self.handle)}"
            )
        if self.nbytes <= 0:
            raise StorageError(f"an allocation needs a positive size, got {self.nbytes}")
        if self.device < 0:
            raise StorageError(f"device index {self.device} is negative")
        check_fits(self.layout, self.nbytes)

    def to_wire(self) -> dict[str, object]:
        return {
            "kind": self.KIND,
            "version": self.VERSION,
            "handle": self.handle,
            "nbytes": self.nbytes,
            "device": self.device,
            "layout": self.layout.to_wire(),
        }

    @classmethod
    def from_wire(cls, value: object) -> "IpcHandle":
        wire = require_map(value, cls.KIND)
        require_kind(wire, cls.KIND, cls.VERSION)
        refuse_unknown(wire, cls._FIELDS, cls.KIND)
        layout = StorageLayout.from_wire(require_field(wire, "layout"))
        handle = require_bytes(wire, "handle", IPC_HANDLE_BYTES)
        nbytes, device = require_int(wire, "nbytes", 1), require_int(wire, "device")
        try:
            return cls(handle, nbytes, device, layout)
        except (LayoutError, StorageError) as err:
            raise WireFormatError(str(err)) from None


class CudaAvailability(NamedTuple):
    available: bool
    reason: str
    device_count: int = 0


def import_cudart() -> Cudart:
    from cuda.bindings import runtime

    return runtime


def probe_cuda(load_cudart: Callable[[], Cudart] = import_cudart) -> CudaAvailability:
    """Whether the CUDA IPC path can run here, and why not. Never raises: a missing package, a
    missing libcuda/libcudart, no driver or no device are all `available=False`."""
    try:
        cudart = load_cudart()
        result = cudart.cudaGetDeviceCount()
    except Exception as err:  # ImportError, DynamicLibNotFoundError, RuntimeError, ...
        return CudaAvailability(False, f"CUDA runtime unusable: {type(err).__name__}: {err}")
    error, count = result[0], result[1]
    if int(error) != 0:
        return CudaAvailability(False, f"cudaGetDeviceCount failed: {error_name(error)}")
    if not count:
        return CudaAvailability(False, "no CUDA device")
    if torch.version.cuda is None:
        return CudaAvailability(False, f"torch {torch.__version__} is built without CUDA")
    if not torch.cuda.is_available():
        return CudaAvailability(False, "torch sees no usable CUDA device")
    return CudaAvailability(True, f"{count} CUDA device(s)", int(count))


def error_name(error: object) -> str:
    name = getattr(error, "name", None)
    return name if isinstance(name, str) else f"cudaError {int(error)}"  # type: ignore[call-overload]


def checked(call: str, result: tuple[Any, ...]) -> tuple[Any, ...]:
    """The values after the cudaError_t that every cuda-python call returns first."""
    if int(result[0]) != 0:
        raise CudaError(call, error_name(result[0]))
    return result[1:]


@contextmanager
def on_device(cudart: Cudart, device: int) -> Iterator[None]:
    """Make `device` current for the block, then restore the caller's current device."""
    (previous,) = checked("cudaGetDevice", cudart.cudaGetDevice())
    checked("cudaSetDevice", cudart.cudaSetDevice(device))
    try:
        yield
    finally:
        checked("cudaSetDevice", cudart.cudaSetDevice(previous))


def handle_to_bytes(handle: Any) -> bytes:
    """The 64 bytes of a cudaIpcMemHandle_t."""
    return ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)


def handle_from_bytes(cudart: Cudart, raw: bytes) -> Any:
    """A cudaIpcMemHandle_t holding `raw`."""
    if len(raw) != IPC_HANDLE_BYTES:
        raise StorageError(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(raw)}")
    handle = cudart.cudaIpcMemHandle_t()
    ctypes.memmove(handle.getPtr(), raw, IPC_HANDLE_BYTES)
    return handle


class DeviceMemory:
    """A range of device memory this process may use: its own cudaMalloc allocation
    (`allocate`) or another process's allocation opened from an IPC handle (`open_handle`)."""

    def __init__(self, cudart: Cudart, ptr: int, nbytes: int, device: int, opened: bool) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.device = device
        self.opened = opened
        self._cudart = cudart
        self._finalizer = weakref.finalize(self, _give_back, cudart, ptr, device, opened)

    @classmethod
    def allocate(cls, cudart: Cudart, nbytes: int, device: int) -> "DeviceMemory":
        """A zero-filled allocation of `nbytes` on `device`."""
        with on_device(cudart, device):
            (ptr,) = checked("cudaMalloc", cudart.cudaMalloc(nbytes))
            memory = cls(cudart, int(ptr), nbytes, device, opened=False)
            checked("cudaMemset", cudart.cudaMemset(memory.ptr, 0, nbytes))
            checked("cudaDeviceSynchronize", cudart.cudaDeviceSynchronize())
        return memory

    @classmethod
    def open_handle(cls, cudart: Cudart, handle: IpcHandle) -> "DeviceMemory":
        """Map another process's allocation; closed again when this object is garbage."""
        flags = cudart.cudaIpcMemLazyEnablePeerAccess
        with on_device(cudart, handle.device):
            raw = handle_from_bytes(cudart, handle.handle)
            (ptr,) = checked("cudaIpcOpenMemHandle", cudart.cudaIpcOpenMemHandle(raw, flags))
        return cls(cudart, int(ptr), handle.nbytes, handle.device, opened=True)

    def export_handle(self) -> bytes:
        """The 64-byte IPC handle of this allocation (taken on its base pointer)."""
        if self.opened:
            raise StorageError("only the process that allocated memory exports its handle")
        with on_device(self._cudart, self.device):
            (handle,) = checked("cudaIpcGetMemHandle", self._cudart.cudaIpcGetMemHandle(self.ptr))
        return handle_to_bytes(handle)

    def cuda_array_interface(self) -> dict[str, object]:
        """__cuda_array_interface__ (v3) of the whole range as bytes; no stream to wait on
        (allocate synchronizes, and an opened handle has no work of ours pending)."""
        return {
            "shape": (self.nbytes,),
            "typestr": "|u1",
            "data": (self.ptr, False),
            "strides": None,
            "stream": None,
            "version": 3,
        }


class PinnedHostMemory:
    """Host memory of this process (a mapping of the host tier) page-locked for CUDA
    (cudaHostRegister, portable: pinned for every device's context), so that copies between
    it and the device are DMA transfers that run on a stream of their own, overlapped with the
    model's kernels; a copy from pageable memory would be staged and synchronous. Unlocked by
    `close` (or when garbage) before the mapping goes."""

    def __init__(self, cudart: Cudart, tensor: torch.Tensor) -> None:
        if tensor.is_cuda or not tensor.is_contiguous():
            raise StorageError("only a contiguous host tensor can be pinned")
        self.ptr = tensor.data_ptr()
        self.nbytes = tensor.numel() * tensor.element_size()
        flags = cudart.cudaHostRegisterPortable
        checked("cudaHostRegister", cudart.cudaHostRegister(self.ptr, self.nbytes, flags))
        self._finalizer = weakref.finalize(self, _unpin, cudart, self.ptr)

    def close(self) -> None:
        self._finalizer()


def _unpin(cudart: Cudart, ptr: int) -> None:
    """Finalizer: unregister pinned host memory. Never raises; a failure is logged."""
    try:
        checked("cudaHostUnregister", cudart.cudaHostUnregister(ptr))
    except Exception as err:
        _log.warning("cudaHostUnregister(0x%x): %s", ptr, err)


class _CudaArray:
    """The object torch.as_tensor reads; torch keeps it, and so the memory, alive."""

    def __init__(self, memory: DeviceMemory) -> None:
        self.memory = memory
        self.__cuda_array_interface__ = memory.cuda_array_interface()


def device_bytes(memory: DeviceMemory) -> torch.Tensor:
    """`memory` as a 1-D uint8 torch tensor on its device, sharing it (checked: no copy)."""
    tensor = torch.as_tensor(_CudaArray(memory), device=f"cuda:{memory.device}")
    if tensor.data_ptr() != memory.ptr or tensor.numel() != memory.nbytes:
        raise StorageError("torch copied device memory instead of viewing it")
    return tensor


def _give_back(cudart: Cudart, ptr: int, device: int, opened: bool) -> None:
    """Finalizer: close an opened handle or free an allocation. Never raises (it may run at
    interpreter exit, after the context is gone); a failure is logged."""
    call = "cudaIpcCloseMemHandle" if opened else "cudaFree"
    try:
        with on_device(cudart, device):
            function = cudart.cudaIpcCloseMemHandle if opened else cudart.cudaFree
            checked(call, function(ptr))
    except Exception as err:
        _log.warning("%s(0x%x) at release: %s", call, ptr, err)
