"""A storage handle survives describe -> the wire -> handle_of unchanged, on both paths; an
inconsistent description is refused before anything is mapped."""

import dataclasses

import pytest

from duetserve.proto import kv
from duetserve.proto.codec import decode, encode
from duetserve.services.kv_manager.cuda_ipc import IpcHandle
from duetserve.services.kv_manager.describe import describe, handle_of
from duetserve.services.kv_manager.errors import StorageError, WireFormatError
from duetserve.services.kv_manager.layout import StorageLayout
from duetserve.services.kv_manager.shared_memory import ShmHandle

LAYOUT = StorageLayout.pack(
    [
        ("kv_pool", "bfloat16", (2, 2, 8, 16, 4, 32)),
        ("embed_tokens", "bfloat16", (100, 64)),
        ("final_norm", "bfloat16", (64,)),
    ],
    alignment=512,
)
GEOMETRY = {"block_size": 16, "num_blocks": 8, "model_dir": "/models/tiny", "dtype": "bfloat16"}


def over_the_wire(description: kv.StorageDescription) -> kv.StorageDescription:
    return decode(encode(description), kv.StorageDescription)


@pytest.mark.parametrize(
    "handle",
    [
        ShmHandle("duet-unit0-123", LAYOUT.nbytes, LAYOUT),
        IpcHandle(bytes(range(64)), LAYOUT.nbytes, 1, LAYOUT),
    ],
    ids=["cpu_shm", "cuda_ipc"],
)
def test_a_handle_round_trips(handle: ShmHandle | IpcHandle) -> None:
    description = over_the_wire(describe(handle, **GEOMETRY))
    assert description.kind.value == handle.KIND
    assert description.alignment == 512 and description.tensors[0].name == "kv_pool"
    assert handle_of(description) == handle


def test_a_layout_must_span_its_region() -> None:
    handle = ShmHandle("duet-unit0-123", LAYOUT.nbytes + 4096, LAYOUT)
    with pytest.raises(StorageError, match="span its region"):
        describe(handle, **GEOMETRY)


def test_inconsistent_descriptions_are_refused() -> None:
    good = describe(ShmHandle("duet-unit0-1", LAYOUT.nbytes, LAYOUT), **GEOMETRY)
    first, second, *rest = good.tensors
    overlapping = dataclasses.replace(second, offset=first.offset)
    bad = [
        dataclasses.replace(good, tensors=(first, overlapping, *rest)),
        dataclasses.replace(good, nbytes=LAYOUT.nbytes - 512),
        dataclasses.replace(good, region="../etc/passwd"),
        dataclasses.replace(good, alignment=32),  # below the smallest layout alignment
        dataclasses.replace(good, tensors=(dataclasses.replace(first, dtype="complex64"),)),
        dataclasses.replace(
            good, kind=kv.StorageKind.CUDA_IPC, cuda_ipc_handle=bytes(64), device_index=None
        ),
    ]
    for description in bad:
        with pytest.raises(WireFormatError):
            handle_of(description)
