"""Linear weights re-laid out once in oneDNN's blocked format, and the same bytes read back as
weights by any process that maps them.

oneDNN multiplies by a weight much faster when the weight is already in the blocked layout its
kernel reads ("prepacked"): measured on this repository's CPU (loadtest/runtime_bench.py), a
bfloat16 decode step runs 1.2-1.6x faster, the batch-1 GEMV 3x. torch makes such weights only as
opaque private tensors. Here the packed bytes are copied out into a plain uint8 tensor (which
kv_manager keeps in the unit's shared memory, beside the other weights) together with oneDNN's
serialized description of the layout; a worker turns the two back into a oneDNN weight tensor
over the SAME memory, without a copy, through torch's C shim
(`aoti_torch_create_tensor_from_blob_v2` with the mkldnn layout: what AOTInductor uses to load
its packed constants).

Stored names: a packed weight `X` is stored as `X:onednn` (uint8, the packed bytes) and
`X:onednn_md` (uint8, the layout's description); the plain `X` is not stored. A tied head is
packed from the embedding table as `lm_head:onednn` and the table stays as it is (a gather reads
it). A tensor built over the bytes does not own them: `unpack_linear_weights` keeps the byte views
in the weights it returns, so the memory lives as long as the weights do.

The packed layout depends on the CPU's instruction set; it is made and read on one machine.
Where any piece is missing (no oneDNN, another torch without the shim), `prepack_support` says
why and callers keep the plain weights.
"""

import ctypes
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from duetserve.runtime.config import ModelConfig
from duetserve.runtime.errors import UnsupportedModelError

PACKED = ":onednn"
METADATA = ":onednn_md"
LAYER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
LM_HEAD = "lm_head"
DTYPES = (torch.float32, torch.bfloat16)
BATCH_HINT = 32  # oneDNN's layout choice for M rows; measured equal from M=1 to M=2048


class PackedLinear(NamedTuple):
    data: torch.Tensor  # uint8 [nbytes]: the packed weight's bytes
    metadata: torch.Tensor  # uint8 [n]: oneDNN's serialized description of their layout


class Support(NamedTuple):
    available: bool
    reason: str


@functools.cache
def prepack_support(dtype: torch.dtype) -> Support:
    """Whether weights in `dtype` can be packed here, read back, and multiplied by."""
    if dtype not in DTYPES:
        kept = ", ".join(map(str, DTYPES))
        return Support(False, f"{dtype} weights are not packed (only {kept})")
    if not torch.backends.mkldnn.is_available():
        return Support(False, "this torch has no oneDNN")
    needed = ("_reorder_linear_weight", "_nbytes", "data_ptr", "_get_mkldnn_serialized_md")
    missing = [name for name in needed if not hasattr(torch.ops.mkldnn, name)]
    if missing or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return Support(False, f"this torch lacks torch.ops.mkldnn.{', '.join(missing)}")
    try:
        _shim()
    except (OSError, AttributeError) as error:
        return Support(False, f"torch's C shim cannot build oneDNN tensors: {error}")
    try:
        _check_round_trip(dtype)
    except (RuntimeError, ValueError) as error:
        return Support(False, f"packed weights do not round-trip: {error}")
    return Support(True, f"oneDNN packed {dtype} weights")


def linear_weight_shape(name: str, config: ModelConfig) -> tuple[int, int]:
    """[out, in] of a linear weight of the runtime layout (weights.py), by its name."""
    h = config.hidden_size
    if name == LM_HEAD:
        return (config.vocab_size, h)
    shapes = {
        "qkv_proj": (config.q_size + 2 * config.kv_size, h),
        "o_proj": (h, config.q_size),
        "gate_up_proj": (2 * config.intermediate_size, h),
        "down_proj": (h, config.intermediate_size),
    }
    try:
        return shapes[name.rsplit(".", 1)[-1]]
    except KeyError:
        raise UnsupportedModelError(f"'{name}' is not a linear weight") from None


def linear_weight_names(config: ModelConfig) -> list[str]:
    names = [f"layers.{i}.{n}" for i in range(config.num_layers) for n in LAYER_LINEARS]
    return [*names, LM_HEAD]


def pack_linear(weight: torch.Tensor) -> PackedLinear:
    """The weight [out, in] in oneDNN's blocked layout, as bytes and their description."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)
    nbytes = torch.ops.mkldnn._nbytes(packed)
    data = torch.empty(nbytes, dtype=torch.uint8)
    ctypes.memmove(data.data_ptr(), torch.ops.mkldnn.data_ptr(packed), nbytes)
    metadata = torch.ops.mkldnn._get_mkldnn_serialized_md(packed).contiguous().clone()
    return PackedLinear(data, metadata)


def packed_view(packed: PackedLinear, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A oneDNN weight tensor over packed.data's memory (no copy). The caller keeps
    packed.data alive for as long as the tensor is used."""
    if packed.data.dtype != torch.uint8 or packed.metadata.dtype != torch.uint8:
        raise ValueError("packed weights are uint8 bytes and uint8 metadata")
    if not (packed.data.is_contiguous() and packed.metadata.is_contiguous()):
        raise ValueError("packed weights must be contiguous")
    need = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    if packed.data.numel() < need:
        raise ValueError(f"{packed.data.numel()} packed bytes cannot hold a {shape} {dtype} weight")
    shim = _shim()
    sizes = (ctypes.c_int64 * 2)(*shape)
    strides = (ctypes.c_int64 * 2)(shape[1], 1)
    handle = ctypes.c_void_p()
    status = shim.create(
        packed.data.data_ptr(),
        2,
        sizes,
        strides,
        0,
        shim.dtypes[dtype],
        shim.cpu,
        0,
        ctypes.byref(handle),
        shim.mkldnn,
        packed.metadata.data_ptr(),
        packed.metadata.numel(),
    )
    if status != 0 or not handle.value:
        raise RuntimeError(f"torch could not build a oneDNN tensor (status {status})")
    capsule: Any = _capsule(handle.value)  # torch's stub says c_void_p; it takes a capsule
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(capsule)


def pack_linear_weights(
    weights: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """The weights with every linear one replaced by its packed bytes and metadata (see the
    module's note on names); a tied head is packed from the embedding table."""
    packed = dict(weights)
    for name in linear_weight_names(config):
        plain = packed.pop(name, None)
        if plain is None and name == LM_HEAD:
            plain = weights["embed_tokens"]  # tied: stored once, packed once for the head
        if plain is None:
            raise UnsupportedModelError(f"weights lack {name}")
        data, metadata = pack_linear(plain)
        packed[name + PACKED] = data
        packed[name + METADATA] = metadata
    return packed


def unpack_linear_weights(
    tensors: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Weights whose packed entries became oneDNN weight tensors over the same bytes; the byte
    views stay in the result, holding the memory. Tensors without packed entries pass as they
    are."""
    weights = dict(tensors)
    for name in linear_weight_names(config):
        if name + PACKED not in tensors:
            continue
        if name + METADATA not in tensors:
            raise UnsupportedModelError(f"{name}{PACKED} has no {name}{METADATA}")
        packed = PackedLinear(tensors[name + PACKED], tensors[name + METADATA])
        dtype = tensors["embed_tokens"].dtype
        weights[name] = packed_view(packed, linear_weight_shape(name, config), dtype)
    return weights


def is_packed(weights: Mapping[str, torch.Tensor]) -> bool:
    return any(name.endswith(PACKED) for name in weights)


class _Shim(NamedTuple):
    create: Callable[..., int]
    dtypes: dict[torch.dtype, int]
    cpu: int
    mkldnn: int


@functools.cache
def _shim() -> _Shim:
    """torch's C shim functions, from the libtorch_cpu this process has loaded."""
    library = ctypes.CDLL(
        os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
        mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL,
    )
    create = library.aoti_torch_create_tensor_from_blob_v2
    create.restype = ctypes.c_int32
    create.argtypes = [
        ctypes.c_void_p,  # data
        ctypes.c_int64,  # ndim
        ctypes.POINTER(ctypes.c_int64),  # sizes
        ctypes.POINTER(ctypes.c_int64),  # strides
        ctypes.c_int64,  # storage offset
        ctypes.c_int32,  # dtype
        ctypes.c_int32,  # device type
        ctypes.c_int32,  # device index
        ctypes.POINTER(ctypes.c_void_p),  # the new tensor handle
        ctypes.c_int32,  # layout
        ctypes.c_void_p,  # opaque metadata
        ctypes.c_int64,  # its size
    ]

    def constant(symbol: str) -> int:
        function = getattr(library, symbol)
        function.restype = ctypes.c_int32
        return int(function())

    dtypes = {
        torch.float32: constant("aoti_torch_dtype_float32"),
        torch.bfloat16: constant("aoti_torch_dtype_bfloat16"),
    }
    return _Shim(
        create,
        dtypes,
        constant("aoti_torch_device_type_cpu"),
        constant("aoti_torch_layout__mkldnn"),
    )


def _capsule(pointer: int) -> object:
    """A PyCapsule around a tensor handle, as torch._C._aoti takes them."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(pointer, None, None)


def _check_round_trip(dtype: torch.dtype) -> None:
    """Pack a small weight, read it back over a copy of its bytes, and multiply by it."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=generator).to(dtype)
    x = torch.randn(3, 32, generator=generator).to(dtype)
    data, metadata = pack_linear(weight)
    copy = PackedLinear(data.clone(), metadata)  # held until the product is taken
    view = packed_view(copy, (48, 32), dtype)
    got = torch.ops.mkldnn._linear_pointwise(x, view, None, "none", [], "")
    want = torch.nn.functional.linear(x.float(), weight.float())
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    if not torch.allclose(got.float(), want, atol=tolerance, rtol=tolerance):
        raise ValueError("the product by the packed weight differs from the plain one")
