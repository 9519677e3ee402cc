"""oneDNN-packed linear weights: packed once, read back in place over other memory (as workers
read kv_manager's shared copy), and multiplied by with the plain weight's result."""

import pytest
import torch
import torch.nn.functional as F

from duetserve.runtime.config import ModelConfig
from duetserve.runtime.layers.linear import pick_linear
from duetserve.runtime.layers.prepack import (
    METADATA,
    PACKED,
    PackedLinear,
    linear_weight_names,
    pack_linear,
    pack_linear_weights,
    packed_view,
    prepack_support,
    unpack_linear_weights,
)
from duetserve.runtime.weights import load_weights
from tests.conftest import ModelDirs
from tests.model_specs import TINY, TINY_QWEN2

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_this_torch_can_pack(dtype: torch.dtype) -> None:
    support = prepack_support(dtype)
    assert support.available, support.reason


def test_other_dtypes_are_refused_with_a_reason() -> None:
    support = prepack_support(torch.float16)
    assert not support.available and "float16" in support.reason


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_a_view_over_copied_bytes_multiplies_like_the_plain_weight(
    dtype: torch.dtype, rows: int
) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 96, generator=generator).to(dtype)  # 200: not a block multiple
    x = torch.randn(rows, 96, generator=generator).to(dtype)
    data, metadata = pack_linear(weight)
    elsewhere = PackedLinear(torch.empty_like(data).copy_(data), metadata)
    view = packed_view(elsewhere, (200, 96), dtype)
    assert view.is_mkldnn and torch.equal(view.to_dense(), weight)
    got = pick_linear(torch.device("cpu"), dtype, packed=True)(x, view, None)
    want = F.linear(x.double(), weight.double())
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and got.shape == (rows, 200)
    assert (got.double() - want).abs().max().item() <= tolerance * want.abs().max().item()


def test_the_view_reads_the_memory_it_is_given_without_a_copy() -> None:
    weight = torch.randn(64, 32)
    data, metadata = pack_linear(weight)
    view = packed_view(PackedLinear(data, metadata), (64, 32), torch.float32)
    x = torch.randn(2, 32)
    before = F.linear(x, view.to_dense())
    data.zero_()  # the same bytes, seen through the view
    assert torch.equal(view.to_dense(), torch.zeros(64, 32))
    assert not torch.equal(before, torch.zeros(2, 64))


def test_too_few_bytes_are_refused() -> None:
    data = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="cannot hold"):
        packed_view(PackedLinear(data, torch.zeros(4, dtype=torch.uint8)), (64, 32), torch.float32)


def test_every_linear_weight_is_packed_and_the_rest_kept(model_dirs: ModelDirs) -> None:
    model_dir = model_dirs.get(TINY)
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config, torch.bfloat16)
    packed = pack_linear_weights(weights, config)
    for name in linear_weight_names(config):
        assert name not in packed and packed[name + PACKED].dtype == torch.uint8
        assert name + METADATA in packed
    assert torch.equal(packed["embed_tokens"], weights["embed_tokens"])
    unpacked = unpack_linear_weights(packed, config)
    for name in linear_weight_names(config):
        assert torch.equal(unpacked[name].to_dense(), weights[name]), name


def test_a_tied_head_is_packed_from_the_embedding_table(model_dirs: ModelDirs) -> None:
    model_dir = model_dirs.get(TINY_QWEN2)
    config = ModelConfig.from_dir(model_dir)
    assert config.tie_word_embeddings
    weights = load_weights(model_dir, config, torch.float32)
    del weights["lm_head"]  # stored once, as kv_manager stores it
    packed = pack_linear_weights(weights, config)
    head = unpack_linear_weights(packed, config)["lm_head"]
    assert torch.equal(head.to_dense(), weights["embed_tokens"])
