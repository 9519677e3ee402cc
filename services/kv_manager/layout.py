"""Where named tensors (the KV pool, every weight) sit in one flat storage region.

A layout is plain data (no torch): names, dtype names, shapes and byte offsets, each offset a
multiple of the layout's alignment (256 bytes by default: cudaMalloc's own alignment, and a
multiple of every dtype's size and of a CPU cache line). With a region's name or IPC handle, it is
all a worker needs to map every tensor. It travels as a map of str/int/list (`to_wire`), with the
field names of `proto.kv.TensorSpec`.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from duetserve.services.kv_manager.errors import LayoutError, WireFormatError
from duetserve.services.kv_manager.wire import (
    refuse_unknown,
    require_int,
    require_list,
    require_map,
    require_str,
)

ALIGNMENT = 256
MIN_ALIGNMENT = 64
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
_SPEC_FIELDS = frozenset({"name", "dtype", "shape", "offset"})
_LAYOUT_FIELDS = frozenset({"alignment", "nbytes", "tensors"})


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPE_ITEMSIZE
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the region

    def __post_init__(self) -> None:
        if not self.name:
            raise LayoutError("a tensor needs a name")
        if self.dtype not in DTYPE_ITEMSIZE:
            raise LayoutError(f"{self.name}: unknown dtype {self.dtype!r}")
        if any(dim < 0 for dim in self.shape):
            raise LayoutError(f"{self.name}: negative dimension in {self.shape}")
        if self.offset < 0:
            raise LayoutError(f"{self.name}: negative offset {self.offset}")

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def to_wire(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
        }

    @classmethod
    def from_wire(cls, value: object) -> "TensorSpec":
        wire = require_map(value, "tensor")
        refuse_unknown(wire, _SPEC_FIELDS, "tensor")
        shape = []
        for dim in require_list(wire, "shape"):
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
                raise WireFormatError(f"shape: {dim!r} is not a dimension")
            shape.append(dim)
        try:
            return cls(
                require_str(wire, "name"),
                require_str(wire, "dtype"),
                tuple(shape),
                require_int(wire, "offset"),
            )
        except LayoutError as err:
            raise WireFormatError(str(err)) from None


@dataclass(frozen=True, slots=True)
class StorageLayout:
    """Tensors in one region of `nbytes`: names unique, offsets aligned, no two overlapping."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int
    alignment: int = ALIGNMENT

    def __post_init__(self) -> None:
        if self.alignment < MIN_ALIGNMENT or self.alignment & (self.alignment - 1):
            raise LayoutError(
                f"alignment {self.alignment} is not a power of two >= {MIN_ALIGNMENT}"
            )
        names = [spec.name for spec in self.tensors]
        if len(set(names)) != len(names):
            raise LayoutError(f"tensor names repeat: {names}")
        previous: TensorSpec | None = None
        for spec in sorted(self.tensors, key=lambda s: (s.offset, s.end)):
            if spec.offset % self.alignment:
                raise LayoutError(f"{spec.name}: offset {spec.offset} not {self.alignment}-aligned")
            if spec.end > self.nbytes:
                raise LayoutError(f"{spec.name}: ends at {spec.end}, past {self.nbytes} bytes")
            if previous is not None and previous.end > spec.offset and spec.nbytes:
                raise LayoutError(f"{spec.name} overlaps {previous.name}")
            previous = spec if spec.nbytes else previous

    @classmethod
    def pack(
        cls, entries: Iterable[tuple[str, str, Sequence[int]]], alignment: int = ALIGNMENT
    ) -> "StorageLayout":
        """(name, dtype, shape) entries one after another, each at the next aligned offset;
        nbytes is the end of the last one rounded up to the alignment."""
        specs = []
        offset = 0
        for name, dtype, shape in entries:
            spec = TensorSpec(name, dtype, tuple(shape), offset)
            specs.append(spec)
            offset = _round_up(spec.end, alignment)
        return cls(tuple(specs), offset, alignment)

    def spec(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise LayoutError(f"no tensor named {name!r} in this layout")

    def to_wire(self) -> dict[str, object]:
        return {
            "alignment": self.alignment,
            "nbytes": self.nbytes,
            "tensors": [spec.to_wire() for spec in self.tensors],
        }

    @classmethod
    def from_wire(cls, value: object) -> "StorageLayout":
        wire = require_map(value, "layout")
        refuse_unknown(wire, _LAYOUT_FIELDS, "layout")
        tensors = tuple(TensorSpec.from_wire(t) for t in require_list(wire, "tensors"))
        try:
            return cls(tensors, require_int(wire, "nbytes"), require_int(wire, "alignment", 1))
        except LayoutError as err:
            raise WireFormatError(str(err)) from None


def check_fits(layout: StorageLayout, nbytes: int) -> None:
    """Refuse a layout that reaches past a region of `nbytes`."""
    if layout.nbytes > nbytes:
        raise LayoutError(f"layout of {layout.nbytes} bytes does not fit a region of {nbytes}")


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment
