"""Tensors over a region's bytes: every tensor of a layout as a zero-copy view of one flat uint8
tensor (the CPU mapping or the CUDA allocation), so both paths share one piece of code."""

import torch

from duetserve.services.kv_manager.errors import LayoutError
from duetserve.services.kv_manager.layout import DTYPE_ITEMSIZE, StorageLayout, TensorSpec

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
assert TORCH_DTYPES.keys() == DTYPE_ITEMSIZE.keys()


def dtype_name(dtype: torch.dtype) -> str:
    """The layout's name for a torch dtype ("bfloat16" for torch.bfloat16)."""
    for name, candidate in TORCH_DTYPES.items():
        if candidate == dtype:
            return name
    raise LayoutError(f"dtype {dtype} cannot be placed in shared storage")


def spec_view(region: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """`spec`'s tensor as a view of `region` (uint8, 1-D, contiguous); never a copy."""
    if region.dtype != torch.uint8 or region.dim() != 1:
        raise LayoutError(
            f"a region is a 1-D uint8 tensor, got {region.dtype} {tuple(region.shape)}"
        )
    if spec.end > region.numel():
        raise LayoutError(f"{spec.name} ends at byte {spec.end}, the region has {region.numel()}")
    if spec.offset % DTYPE_ITEMSIZE[spec.dtype]:
        raise LayoutError(f"{spec.name}: offset {spec.offset} not a multiple of its dtype size")
    raw = region[spec.offset : spec.end]
    return raw.view(TORCH_DTYPES[spec.dtype]).view(spec.shape)


def layout_views(region: torch.Tensor, layout: StorageLayout) -> dict[str, torch.Tensor]:
    """Every tensor of `layout`, by name, as views of `region`."""
    if layout.nbytes > region.numel():
        raise LayoutError(f"layout of {layout.nbytes} bytes, region of {region.numel()}")
    return {spec.name: spec_view(region, spec) for spec in layout.tensors}
