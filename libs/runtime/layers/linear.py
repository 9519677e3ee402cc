"""Matrix multiplication by a weight in [out, in] layout, picked once for the device and dtype.

On x86 CPUs torch's float32 `F.linear` goes through MKL, which runs at about half of oneDNN's
speed on AMD processors (measured in loadtest/runtime_bench.py: decode GEMVs and prefill GEMMs
alike). oneDNN's linear takes the plain dense weight as well as a prepacked one (prepack.py),
which is faster still and shareable the same way.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def pick_linear(device: torch.device, dtype: torch.dtype, packed: bool = False) -> Linear:
    """oneDNN for packed weights (they are oneDNN tensors) and for plain float32 ones on the
    CPU; torch's own elsewhere."""
    if packed:
        return _onednn_linear
    onednn = (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )
    return _onednn_linear if onednn else _torch_linear
