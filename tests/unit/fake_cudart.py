"""A stand-in for cuda-python's runtime module (`cuda.bindings.runtime`), modelling only what
CUDA documents for the calls kv_manager makes: every call returns (cudaError_t, *values), device
memory is {base pointer: size}, and an IPC handle carries the exporter's base pointer.

One simplification: real CUDA refuses to open a handle in the process that exported it; the fake
opens it and hands out a different address, as another process would see."""

import ctypes
from enum import IntEnum
from typing import Any

from cuda.bindings import runtime as real_cudart

from duetserve.services.kv_manager.cuda_ipc import handle_to_bytes


class Err(IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorMapBufferObjectFailed = 205
    cudaErrorInvalidResourceHandle = 400


class FakeCudart:
    """Records every call in `calls`; `fail` makes the named calls return that error."""

    cudaIpcMemHandle_t = real_cudart.cudaIpcMemHandle_t
    cudaIpcMemLazyEnablePeerAccess = real_cudart.cudaIpcMemLazyEnablePeerAccess
    cudaHostRegisterPortable = real_cudart.cudaHostRegisterPortable

    def __init__(self, device_count: int = 2, fail: dict[str, Err] | None = None) -> None:
        self.device_count = device_count
        self.fail = fail or {}
        self.calls: list[tuple[Any, ...]] = []
        self.current = 0
        self.allocations: dict[int, int] = {}
        self.opened: dict[int, int] = {}  # mapped pointer -> exporter's pointer
        self.pinned: dict[int, int] = {}  # registered host pointer -> bytes

    def _result(self, call: str, *args: Any, error: Err = Err.cudaSuccess) -> tuple[Any, ...]:
        self.calls.append((call, *args))
        return (self.fail.get(call, error),)

    def cudaGetDeviceCount(self) -> tuple[Any, ...]:
        return (*self._result("cudaGetDeviceCount"), self.device_count)

    def cudaGetDevice(self) -> tuple[Any, ...]:
        return (*self._result("cudaGetDevice"), self.current)

    def cudaSetDevice(self, device: int) -> tuple[Any, ...]:
        valid = 0 <= device < self.device_count
        result = self._result("cudaSetDevice", device, error=Err(0 if valid else 101))
        self.current = device if result[0] == 0 else self.current
        return result

    def cudaMalloc(self, nbytes: int) -> tuple[Any, ...]:
        (error,) = self._result("cudaMalloc", nbytes)
        if error:
            return (error, None)
        ptr = 0x7F00_0000_0000 + 0x1_0000_0000 * len(self.allocations)
        self.allocations[ptr] = nbytes
        return (error, ptr)

    def cudaMemset(self, ptr: int, value: int, count: int) -> tuple[Any, ...]:
        ok = self.allocations.get(ptr, -1) >= count
        return self._result("cudaMemset", ptr, value, count, error=Err(0 if ok else 1))

    def cudaDeviceSynchronize(self) -> tuple[Any, ...]:
        return self._result("cudaDeviceSynchronize")

    def cudaIpcGetMemHandle(self, ptr: int) -> tuple[Any, ...]:
        (error,) = self._result("cudaIpcGetMemHandle", ptr, error=Err(ptr not in self.allocations))
        handle = self.cudaIpcMemHandle_t()
        ctypes.memmove(handle.getPtr(), b"fake" + ptr.to_bytes(8, "little"), 12)
        return (error, handle if error == 0 else None)

    def cudaIpcOpenMemHandle(self, handle: Any, flags: int) -> tuple[Any, ...]:
        raw = handle_to_bytes(handle)
        exported = int.from_bytes(raw[4:12], "little")
        ok = raw[:4] == b"fake" and exported in self.allocations and flags == 1
        (error,) = self._result("cudaIpcOpenMemHandle", raw, flags, error=Err(0 if ok else 400))
        if error:
            return (error, None)
        mapped = 0x7E00_0000_0000 + 0x1_0000_0000 * len(self.opened)
        self.opened[mapped] = exported
        return (error, mapped)

    def cudaIpcCloseMemHandle(self, ptr: int) -> tuple[Any, ...]:
        return self._result("cudaIpcCloseMemHandle", ptr, error=Err(ptr not in self.opened))

    def cudaFree(self, ptr: int) -> tuple[Any, ...]:
        return self._result("cudaFree", ptr, error=Err(ptr not in self.allocations))

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> tuple[Any, ...]:
        overlaps = any(p < ptr + nbytes and ptr < p + n for p, n in self.pinned.items())
        ok = nbytes > 0 and not overlaps  # cudaErrorHostMemoryAlreadyRegistered: 712
        (error,) = self._result("cudaHostRegister", ptr, nbytes, flags, error=Err(0 if ok else 1))
        if not error:
            self.pinned[ptr] = nbytes
        return (error,)

    def cudaHostUnregister(self, ptr: int) -> tuple[Any, ...]:
        (error,) = self._result("cudaHostUnregister", ptr, error=Err(ptr not in self.pinned))
        if not error:
            del self.pinned[ptr]
        return (error,)
