"""CPU shared storage: a /dev/shm region written in one process is the same memory in another
(a separate python process maps it by name and layout alone), nothing but unlink() removes it,
and layouts and handles survive msgpack."""

import os
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import torch

from duetserve.services.kv_manager.errors import (
    LayoutError,
    RegionExists,
    RegionNotFound,
    SharedMemoryError,
    WireFormatError,
)
from duetserve.services.kv_manager.layout import StorageLayout, TensorSpec
from duetserve.services.kv_manager.shared_memory import SHM_DIR, SharedRegion, ShmHandle
from duetserve.services.kv_manager.storage import CpuSharedStorage, attach_storage
from duetserve.services.kv_manager.views import DTYPE_ITEMSIZE, TORCH_DTYPES

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this machine")


@pytest.fixture
def name() -> Iterator[str]:
    region = f"duet-test-{uuid.uuid4().hex[:12]}"
    yield region
    (SHM_DIR / region).unlink(missing_ok=True)


def run_child(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


CHILD_REGION = """
    import sys, torch
    from duetserve.services.kv_manager.shared_memory import SharedRegion
    region = SharedRegion.attach(sys.argv[1])
    view = region.tensor(torch.float32, (4, 8), offset=256)
    print(view.sum().item())
    view[3] = -1.0  # written here, read in the parent
"""


def test_another_process_shares_the_same_memory(name: str) -> None:
    region = SharedRegion.create(name, 4096)
    view = region.tensor(torch.float32, (4, 8), offset=256)
    assert view.sum().item() == 0.0  # a new region is zero-filled
    view.copy_(torch.arange(32, dtype=torch.float32).view(4, 8))
    assert float(run_child(CHILD_REGION, name)) == sum(range(32))
    # The parent's view, made before the child ran, sees the child's write: one memory.
    assert view[3].tolist() == [-1.0] * 8 and view[2, 0].item() == 16.0
    assert (SHM_DIR / name).exists()  # the child's exit did not unlink it
    region.close()
    region.unlink()
    assert not (SHM_DIR / name).exists()
    region.unlink()  # idempotent
    with pytest.raises(RegionNotFound):
        SharedRegion.attach(name)


def test_close_leaves_views_valid_and_refuses_new_ones(name: str) -> None:
    region = SharedRegion.create(name, 1024)
    view = region.tensor(torch.int64, (8,))
    region.close()
    region.close()
    view.fill_(7)  # still mapped: the view holds the mapping
    assert view.sum().item() == 56 and region.closed
    with pytest.raises(SharedMemoryError, match="closed"):
        region.tensor(torch.int64, (8,))
    again = SharedRegion.attach(name)
    assert again.tensor(torch.int64, (8,)).tolist() == [7] * 8
    region.unlink()


def test_create_and_attach_refusals(name: str) -> None:
    region = SharedRegion.create(name, 512)
    with pytest.raises(RegionExists):
        SharedRegion.create(name, 512)
    for bad in ["", "../etc", "a/b", ".hidden", "x" * 300]:
        with pytest.raises(SharedMemoryError, match="not a valid"):
            SharedRegion.create(bad, 512)
    with pytest.raises(SharedMemoryError, match="positive size"):
        SharedRegion.create(name + "-0", 0)
    with pytest.raises(LayoutError, match="ends at byte"):
        region.tensor(torch.float32, (129,))
    with pytest.raises(LayoutError, match="multiple of its dtype size"):
        region.tensor(torch.float32, (2,), offset=2)
    region.unlink()


def test_layout_packs_aligned_and_round_trips_msgpack() -> None:
    layout = StorageLayout.pack(
        [("kv", "bfloat16", (2, 2, 5, 16, 2, 8)), ("embed", "float32", (7, 3)), ("e", "int8", (0,))]
    )
    assert [s.offset % 256 for s in layout.tensors] == [0, 0, 0]
    assert layout.spec("embed").offset == 2 * 2 * 5 * 16 * 2 * 8 * 2
    assert layout.nbytes % 256 == 0 and layout.nbytes >= layout.spec("embed").end
    wire = msgpack.unpackb(msgpack.packb(layout.to_wire()), raw=False)
    assert StorageLayout.from_wire(wire) == layout
    handle = ShmHandle("duet-unit-0", layout.nbytes, layout)
    assert ShmHandle.from_wire(msgpack.unpackb(msgpack.packb(handle.to_wire()))) == handle


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w["tensors"][1].update(offset=64), "not 256-aligned"),
        (lambda w: w["tensors"][1].update(offset=0), "overlaps"),
        (lambda w: w["tensors"][0].update(dtype="complex64"), "unknown dtype"),
        (lambda w: w["tensors"][0].update(shape=[4, -1]), "not a dimension"),
        (lambda w: w["tensors"][0].update(shape=[4, True]), "not a dimension"),
        (lambda w: w["tensors"][1].update(name="a"), "names repeat"),
        (lambda w: w.update(nbytes=290), "past 290 bytes"),
        (lambda w: w.update(alignment=48), "power of two"),
        (lambda w: w.update(nbytes="512"), "expected an integer"),
        (lambda w: w.update(extra=1), "unknown field"),
        (lambda w: w.pop("tensors"), "missing field 'tensors'"),
        (lambda w: w["tensors"].append("b"), "expected a map"),
    ],
)
def test_layout_from_wire_refuses_bad_maps(change: object, message: str) -> None:
    wire = StorageLayout.pack([("a", "float32", (4, 4)), ("b", "int32", (10,))]).to_wire()
    change(wire)  # type: ignore[operator]
    with pytest.raises(WireFormatError, match=message):
        StorageLayout.from_wire(wire)


def test_shm_handle_refuses_other_kinds_versions_and_sizes() -> None:
    layout = StorageLayout.pack([("a", "float32", (64,))])
    wire = ShmHandle("duet-unit-0", 256, layout).to_wire()
    for key, value, message in [
        ("kind", "cuda_ipc", "expected kind"),
        ("version", 2, "version 2 not supported"),
        ("nbytes", 128, "does not fit"),
        ("region", "../x", "not a valid"),
    ]:
        with pytest.raises(WireFormatError, match=message):
            ShmHandle.from_wire({**wire, key: value})


def test_dtype_tables_agree() -> None:
    assert TORCH_DTYPES.keys() == DTYPE_ITEMSIZE.keys()
    assert all(TORCH_DTYPES[n].itemsize == size for n, size in DTYPE_ITEMSIZE.items())
    with pytest.raises(LayoutError):
        TensorSpec("x", "float32", (2,), -256)


CHILD_WORKER = """
    import sys, msgpack, torch
    from duetserve.services.kv_manager.storage import attach_storage
    mapped = attach_storage(msgpack.unpackb(bytes.fromhex(sys.argv[1])))
    weight, kv = mapped.tensors["layers.0.weight"], mapped.tensors["kv_pool"]
    assert weight.dtype == torch.bfloat16 and kv.shape == (2, 2, 4, 16, 2, 8)
    kv[1, 0, 3] = weight[0, :8].float().sum()  # "prefill" writes one block from the weights
    print(mapped.tensors["step"].item())
    mapped.close()
"""


def test_a_worker_maps_pool_and_weights_from_name_and_layout(name: str) -> None:
    layout = StorageLayout.pack(
        [
            ("kv_pool", "float32", (2, 2, 4, 16, 2, 8)),  # [L, K/V, blocks, block_size, Hkv, D]
            ("layers.0.weight", "bfloat16", (3, 8)),
            ("step", "int64", ()),
        ]
    )
    storage = CpuSharedStorage.create(name, layout)
    storage.tensors["layers.0.weight"].copy_(torch.ones(3, 8))
    storage.tensors["step"].fill_(41)
    wire = msgpack.packb(storage.handle().to_wire())
    assert run_child(CHILD_WORKER, wire.hex()).strip() == "41"
    kv = storage.tensors["kv_pool"]
    assert torch.all(kv[1, 0, 3] == 8.0) and kv.sum().item() == 8.0 * 16 * 2 * 8
    mapped = attach_storage(storage.handle())  # the same process may map it too
    assert mapped.tensors["step"].data_ptr() != storage.tensors["step"].data_ptr()
    mapped.tensors["step"].fill_(42)
    assert storage.tensors["step"].item() == 42  # a second mapping, the same memory
    storage.close()
    assert not Path(SHM_DIR / name).exists()
    assert mapped.tensors["step"].item() == 42  # mappings outlive the name


def test_a_region_is_readable_by_its_owner_only(name: str) -> None:
    """The KV pool and the weights are the stack's alone: mode 0600 whatever the umask."""
    previous = os.umask(0)
    try:
        region = SharedRegion.create(name, 4096)
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE((SHM_DIR / name).stat().st_mode) == 0o600
    finally:
        region.close()
        region.unlink()
