"""Memory-mapped safetensors reading: tensors are views of a private (copy-on-write) mapping of
the file, so opening a checkpoint reads nothing until a tensor is touched. Never pickle.

The format: 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw data.
"""

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from duetserve.runtime.errors import UnsupportedModelError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of one file, each a view of the file's mapping."""
    with path.open("rb") as file:
        length_bytes = file.read(8)
        if len(length_bytes) != 8:
            raise UnsupportedModelError(f"{path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", length_bytes)
        if header_len > _MAX_HEADER_BYTES:
            raise UnsupportedModelError(f"{path}: safetensors header of {header_len} bytes")
        try:
            header = json.loads(file.read(header_len))
        except ValueError as err:
            raise UnsupportedModelError(f"{path}: unreadable safetensors header: {err}") from None
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    data_start = 8 + header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        yield name, _tensor_view(path, mapping, data_start, name, entry)


def _tensor_view(
    path: Path, mapping: mmap.mmap, data_start: int, name: str, entry: dict[str, object]
) -> torch.Tensor:
    dtype = _DTYPES.get(str(entry.get("dtype")))
    if dtype is None:
        raise UnsupportedModelError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    shape = [int(d) for d in entry["shape"]]  # type: ignore[attr-defined]
    begin, end = (int(x) for x in entry["data_offsets"])  # type: ignore[attr-defined]
    count = 1
    for dim in shape:
        count *= dim
    if end - begin != count * dtype.itemsize or data_start + end > len(mapping):
        raise UnsupportedModelError(f"{path}: tensor {name} has an inconsistent byte range")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    offset = data_start + begin
    if offset % dtype.itemsize:  # misaligned data: copy rather than view
        raw = bytearray(mapping[offset : offset + end - begin])
        return torch.frombuffer(raw, dtype=dtype).reshape(shape)
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded or not); refuses pickle-only checkpoints."""
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise UnsupportedModelError(
            f"{model_dir}: only pickle weights (*.bin/*.pt) found; Duet loads safetensors only"
        )
    raise UnsupportedModelError(f"{model_dir}: no *.safetensors weights")
