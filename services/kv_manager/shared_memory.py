"""POSIX shared memory on the CPU: a file under /dev/shm that kv_manager creates and every worker
maps (MAP_SHARED), so the KV pool and the weights exist once and are never copied.

Done with os.open and mmap rather than multiprocessing.shared_memory: on Python 3.11 the stdlib
registers every segment with the resource tracker, which unlinks it when a process that merely
attached exits. Here only `unlink()` removes a name.

Lifetime. `close()` drops this object's reference to the mapping; tensors handed out hold their
own, so the memory is unmapped when the last of them is gone and a view never dangles. `unlink()`
removes the name (idempotent): processes that mapped it keep their mapping, new ones cannot
attach. Segments are created 0600: every process of a unit runs as the same user.
"""

import contextlib
import mmap
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import torch

from duetserve.services.kv_manager.errors import (
    LayoutError,
    RegionExists,
    RegionNotFound,
    SharedMemoryError,
    WireFormatError,
)
from duetserve.services.kv_manager.layout import StorageLayout, TensorSpec, check_fits
from duetserve.services.kv_manager.views import dtype_name, spec_view
from duetserve.services.kv_manager.wire import (
    refuse_unknown,
    require_field,
    require_int,
    require_kind,
    require_map,
    require_str,
)

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


class SharedRegion:
    """One mapped /dev/shm segment. Make one with `create` or `attach`."""

    def __init__(self, name: str, mapping: mmap.mmap) -> None:
        self.name = name
        self.nbytes = len(mapping)
        self._mapping: mmap.mmap | None = mapping
        self._bytes: torch.Tensor | None = torch.frombuffer(mapping, dtype=torch.uint8)

    @classmethod
    def create(cls, name: str, nbytes: int) -> "SharedRegion":
        """A new zero-filled segment of `nbytes`, its memory reserved up front so that running
        out of /dev/shm is an error here and never a SIGBUS on a later write."""
        path = region_path(name)
        if nbytes <= 0:
            raise SharedMemoryError(f"{name}: a region needs a positive size, got {nbytes}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise RegionExists(
                f"{path} already exists (another unit, or a stale segment)"
            ) from None
        except OSError as err:
            raise SharedMemoryError(f"cannot create {path}: {err.strerror}") from None
        try:
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except OSError as err:
            os.unlink(path)
            raise SharedMemoryError(
                f"cannot reserve {nbytes} bytes in {SHM_DIR} ({err.strerror}); "
                "a container needs a larger shm_size"
            ) from None
        finally:
            os.close(fd)
        return cls(name, mapping)

    @classmethod
    def attach(cls, name: str) -> "SharedRegion":
        """Map an existing segment, read and write, at its full size."""
        path = region_path(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise RegionNotFound(f"{path} does not exist") from None
        except OSError as err:
            raise SharedMemoryError(f"cannot open {path}: {err.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise SharedMemoryError(f"{path} is empty")
            mapping = mmap.mmap(fd, size)
        except OSError as err:
            raise SharedMemoryError(f"cannot map {path}: {err.strerror}") from None
        finally:
            os.close(fd)
        return cls(name, mapping)

    @property
    def closed(self) -> bool:
        return self._bytes is None

    def bytes_view(self) -> torch.Tensor:
        """The whole region as a 1-D uint8 tensor sharing its memory."""
        if self._bytes is None:
            raise SharedMemoryError(f"region {self.name} is closed")
        return self._bytes

    def tensor(self, dtype: torch.dtype, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
        """A zero-copy view of `shape` elements of `dtype` starting `offset` bytes in."""
        spec = TensorSpec(f"{self.name}@{offset}", dtype_name(dtype), tuple(shape), offset)
        return spec_view(self.bytes_view(), spec)

    def close(self) -> None:
        """Drop this object's reference to the mapping (idempotent); views stay valid."""
        self._bytes = None
        self._mapping = None

    def unlink(self) -> None:
        """Remove the name from /dev/shm (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(region_path(self.name))

    def __enter__(self) -> "SharedRegion":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def region_path(name: str) -> Path:
    """/dev/shm/<name>; names are letters, digits, '.', '_' and '-', not starting with '.'."""
    if not _NAME.fullmatch(name):
        raise SharedMemoryError(f"not a valid shared-memory region name: {name!r}")
    return SHM_DIR / name


@dataclass(frozen=True, slots=True)
class ShmHandle:
    """What a worker needs to map a CPU storage: the region's name, its size, its tensors."""

    KIND: ClassVar[str] = "cpu_shm"
    VERSION: ClassVar[int] = 1
    _FIELDS: ClassVar[frozenset[str]] = frozenset({"kind", "version", "region", "nbytes", "layout"})

    region: str
    nbytes: int
    layout: StorageLayout

    def __post_init__(self) -> None:
        region_path(self.region)
        check_fits(self.layout, self.nbytes)

    def to_wire(self) -> dict[str, object]:
        return {
            "kind": self.KIND,
            "version": self.VERSION,
            "region": self.region,
            "nbytes": self.nbytes,
            "layout": self.layout.to_wire(),
        }

    @classmethod
    def from_wire(cls, value: object) -> "ShmHandle":
        wire = require_map(value, cls.KIND)
        require_kind(wire, cls.KIND, cls.VERSION)
        refuse_unknown(wire, cls._FIELDS, cls.KIND)
        layout = StorageLayout.from_wire(require_field(wire, "layout"))
        region, nbytes = require_str(wire, "region"), require_int(wire, "nbytes", 1)
        try:
            return cls(region, nbytes, layout)
        except (LayoutError, SharedMemoryError) as err:
            raise WireFormatError(str(err)) from None
