"""The unit's storage, as kv_manager and its workers see it: one region holding the KV pool and
every weight tensor, created once by kv_manager and mapped by each worker without a copy.

kv_manager: `open_storage(layout, name, prefer)` picks CUDA IPC when `probe_cuda()` says it can
run (else CPU shared memory, with the reason to log), and its `handle()` is what travels to
workers. A worker: `attach_storage(handle or its wire map)` gives the same tensors by name.

Lifetime, on both paths: `close()` drops the storage object's own references and never pulls
memory from under a live tensor; the memory goes when the last view of it does. kv_manager closes
its storage only after its workers have closed theirs (CUDA forbids freeing memory another process
still has open; on the CPU, close also unlinks the /dev/shm name so no new worker can attach).
"""

import logging
from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple, Protocol

import torch

from duetserve.runtime.compute_share.activity import remove_activity
from duetserve.services.kv_manager.cuda_ipc import (
    CudaAvailability,
    Cudart,
    DeviceMemory,
    IpcHandle,
    device_bytes,
    import_cudart,
    probe_cuda,
)
from duetserve.services.kv_manager.errors import (
    CudaError,
    CudaUnavailable,
    SharedMemoryError,
    WireFormatError,
)
from duetserve.services.kv_manager.layout import StorageLayout, check_fits
from duetserve.services.kv_manager.shared_memory import SharedRegion, ShmHandle
from duetserve.services.kv_manager.views import layout_views
from duetserve.services.kv_manager.wire import require_map, require_str

StorageHandle = ShmHandle | IpcHandle
Prefer = Literal["auto", "cpu", "cuda"]
_log = logging.getLogger(__name__)


class Storage(Protocol):
    """Storage kv_manager owns: its tensors by name, and the handle workers map them from."""

    @property
    def layout(self) -> StorageLayout: ...

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]: ...

    def handle(self) -> StorageHandle: ...

    def close(self) -> None:
        """Idempotent; see the module's note on lifetime."""


class CpuSharedStorage:
    """A /dev/shm region holding the layout's tensors."""

    def __init__(self, region: SharedRegion, layout: StorageLayout) -> None:
        check_fits(layout, region.nbytes)
        self._region = region
        self._layout = layout
        self._tensors = layout_views(region.bytes_view(), layout)

    @classmethod
    def create(cls, name: str, layout: StorageLayout) -> "CpuSharedStorage":
        region = SharedRegion.create(name, layout.nbytes)
        return cls(region, layout)

    @property
    def layout(self) -> StorageLayout:
        return self._layout

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self._tensors

    def handle(self) -> ShmHandle:
        return ShmHandle(self._region.name, self._region.nbytes, self._layout)

    def close(self) -> None:
        self._tensors = {}
        self._region.close()
        self._region.unlink()
        remove_activity(self._region.name)  # the workers' (compute_share/activity.py)


class CudaIpcStorage:
    """One cudaMalloc allocation on `device` holding the layout's tensors."""

    def __init__(self, memory: DeviceMemory, layout: StorageLayout) -> None:
        check_fits(layout, memory.nbytes)
        self._handle = IpcHandle(memory.export_handle(), memory.nbytes, memory.device, layout)
        self._memory: DeviceMemory | None = memory
        self._tensors = layout_views(device_bytes(memory), layout)

    @classmethod
    def create(
        cls, layout: StorageLayout, device: int = 0, cudart: Cudart | None = None
    ) -> "CudaIpcStorage":
        runtime = import_cudart() if cudart is None else cudart
        return cls(DeviceMemory.allocate(runtime, layout.nbytes, device), layout)

    @property
    def layout(self) -> StorageLayout:
        return self._handle.layout

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self._tensors

    def handle(self) -> IpcHandle:
        return self._handle

    def close(self) -> None:
        self._tensors = {}
        self._memory = None


class OpenedStorage(NamedTuple):
    storage: Storage
    reason: str  # why this kind of storage: what kv_manager logs at start-up


def open_storage(
    layout: StorageLayout,
    name: str,
    prefer: Prefer = "auto",
    device: int = 0,
    probe: Callable[[], CudaAvailability] = probe_cuda,
    cudart: Cudart | None = None,
) -> OpenedStorage:
    """The unit's storage: CUDA IPC on `device` if preferred or possible, else /dev/shm/`name`.
    prefer="cuda" raises CudaUnavailable where CUDA cannot run; "auto" falls back and says why.
    `probe` and `cudart` are there for tests; the defaults are the real ones."""
    if prefer == "cpu":
        return _cpu(layout, name, "CPU shared memory requested")
    availability = probe()
    if not availability.available:
        if prefer == "cuda":
            raise CudaUnavailable(f"CUDA storage requested, but {availability.reason}")
        return _cpu(layout, name, f"CUDA unavailable ({availability.reason})")
    try:
        storage = CudaIpcStorage.create(layout, device, cudart)
    except CudaError as err:
        if prefer == "cuda":
            raise
        return _cpu(layout, name, f"CUDA storage failed ({err})")
    reason = f"CUDA IPC memory on device {device} ({availability.reason})"
    _log.info("storage: %s", reason)
    return OpenedStorage(storage, reason)


def _cpu(layout: StorageLayout, name: str, why: str) -> OpenedStorage:
    reason = f"{why}; using CPU shared memory /dev/shm/{name}"
    _log.info("storage: %s", reason)
    return OpenedStorage(CpuSharedStorage.create(name, layout), reason)


class MappedStorage:
    """A worker's mapping of the unit's storage: the tensors by name, all views, no copies."""

    def __init__(self, handle: StorageHandle, tensors: dict[str, torch.Tensor]) -> None:
        self.handle = handle
        self.tensors = tensors

    def close(self) -> None:
        """Drop the mapping's own references (idempotent); memory goes with the last view."""
        self.tensors = {}


def handle_from_wire(value: object) -> StorageHandle:
    """A storage handle from its wire map, by its "kind"; an unknown kind is refused."""
    kind = require_str(require_map(value, "storage"), "kind")
    if kind == ShmHandle.KIND:
        return ShmHandle.from_wire(value)
    if kind == IpcHandle.KIND:
        return IpcHandle.from_wire(value)
    raise WireFormatError(f"unknown storage kind {kind!r}")


def attach_storage(
    handle: StorageHandle | Mapping[str, object], cudart: Cudart | None = None
) -> MappedStorage:
    """Map the storage a handle (or its wire map) describes, in this process."""
    if not isinstance(handle, ShmHandle | IpcHandle):
        handle = handle_from_wire(handle)
    if isinstance(handle, ShmHandle):
        region = SharedRegion.attach(handle.region)
        if region.nbytes != handle.nbytes:
            region.close()
            raise SharedMemoryError(
                f"{handle.region} has {region.nbytes} bytes, the handle says {handle.nbytes}"
            )
        tensors = layout_views(region.bytes_view(), handle.layout)
        region.close()  # the views hold the mapping
        return MappedStorage(handle, tensors)
    runtime = import_cudart() if cudart is None else cudart
    memory = DeviceMemory.open_handle(runtime, handle)
    return MappedStorage(handle, layout_views(device_bytes(memory), handle.layout))
