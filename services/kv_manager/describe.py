"""The unit's storage handle as a wire message, and back: kv_manager answers `storage` queries
with `describe(handle, ...)`, and a worker maps what `handle_of(description)` gives it.

The description's `nbytes` is both the region's size and the layout's: kv_manager always sizes
the region (the /dev/shm segment, or the cudaMalloc allocation) to its layout exactly, so
`describe` refuses a handle whose layout does not span its region, and the round trip
`handle_of(describe(handle, ...)) == handle` holds for every handle it accepts.
"""

from duetserve.proto import kv
from duetserve.services.kv_manager.cuda_ipc import IpcHandle
from duetserve.services.kv_manager.errors import StorageError, WireFormatError
from duetserve.services.kv_manager.layout import StorageLayout, TensorSpec
from duetserve.services.kv_manager.shared_memory import ShmHandle


def describe(
    handle: ShmHandle | IpcHandle,
    *,
    block_size: int,
    num_blocks: int,
    model_dir: str,
    dtype: str,
) -> kv.StorageDescription:
    """What a worker needs to map the unit's storage and to know what is in it."""
    layout = handle.layout
    if layout.nbytes != handle.nbytes:
        raise StorageError(
            f"layout of {layout.nbytes} bytes in a region of {handle.nbytes}: "
            "a described layout must span its region exactly"
        )
    ipc_handle: bytes | None = None
    device: int | None = None
    if isinstance(handle, ShmHandle):
        kind, region = kv.StorageKind.CPU_SHARED_MEMORY, handle.region
    else:
        kind, region = kv.StorageKind.CUDA_IPC, ""
        ipc_handle, device = handle.handle, handle.device
    return kv.StorageDescription(
        kind=kind,
        region=region,
        cuda_ipc_handle=ipc_handle,
        device_index=device,
        nbytes=handle.nbytes,
        tensors=tuple(
            kv.TensorSpec(spec.name, spec.dtype, spec.shape, spec.offset) for spec in layout.tensors
        ),
        block_size=block_size,
        num_blocks=num_blocks,
        model_dir=model_dir,
        dtype=dtype,
        alignment=layout.alignment,
    )


def handle_of(description: kv.StorageDescription) -> ShmHandle | IpcHandle:
    """The handle to map a described storage with; WireFormatError if it is inconsistent
    (tensors that overlap or overrun, a bad region name, a CUDA storage without a device)."""
    try:
        tensors = tuple(
            TensorSpec(spec.name, spec.dtype, spec.shape, spec.offset)
            for spec in description.tensors
        )
        layout = StorageLayout(tensors, description.nbytes, description.alignment)
        if description.kind == kv.StorageKind.CPU_SHARED_MEMORY:
            return ShmHandle(description.region, description.nbytes, layout)
        if description.cuda_ipc_handle is None or description.device_index is None:
            raise WireFormatError("a CUDA IPC storage needs a handle and a device index")
        return IpcHandle(
            description.cuda_ipc_handle, description.nbytes, description.device_index, layout
        )
    except WireFormatError:
        raise
    except StorageError as err:  # layout, region name or IPC handle checks
        raise WireFormatError(f"storage description refused: {err}") from None
