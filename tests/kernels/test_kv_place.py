"""Reused KV placed at new positions (kernels/kv_place.py): the Triton path (on CUDA where a GPU
exists, else in the Triton interpreter, see tests/conftest.py) and the CPU path against the
float64 reference; keys turned by a position change equal keys computed at the new position
(layer 0, where a key depends on its own token only), for plain RoPE and Llama 3's scaling."""

from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from duetserve.runtime.config import RopeScaling
from duetserve.runtime.errors import ShapeError
from duetserve.runtime.kernels.kv_place import (
    place_kv,
    place_kv_cpu,
    place_kv_ref,
    place_kv_triton,
)
from duetserve.runtime.layers.rotary import RotaryEmbedding, inverse_frequencies

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 8, 16, 2, 64
LLAMA3 = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def cache(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [N, bs, Hkv, D], interleaved in one pool as the runtime's (non-contiguous)."""
    torch.manual_seed(0)
    pool = torch.randn(NUM_BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD_DIM, device=device).to(dtype)
    return pool[:, 0], pool[:, 1]


def moves(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """21 tokens from blocks 0-2 into blocks 5-7, out of order, moved up and down."""
    generator = torch.Generator().manual_seed(1)
    src = torch.randperm(3 * BLOCK_SIZE, generator=generator)[:21]
    dst = 5 * BLOCK_SIZE + torch.randperm(3 * BLOCK_SIZE, generator=generator)[:21]
    deltas = torch.randint(-3000, 3000, (21,), generator=generator)
    return src.to(device), dst.to(device), deltas.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_each_path_matches_the_reference_and_writes_nothing_else(
    dtype: torch.dtype, path: str
) -> None:
    device = DEVICE if path == "triton" else torch.device("cpu")
    place = place_kv_triton if path == "triton" else place_kv_cpu
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, None).to(device)
    src, dst, deltas = moves(device)
    k, v = cache(dtype, device)
    k_ref, v_ref = k.clone(), v.clone()
    place(k, v, src, dst, deltas, inv_freq)
    place_kv_ref(k_ref, v_ref, src.cpu(), dst.cpu(), deltas.cpu(), inv_freq.cpu())
    # The paths turn by angles in float32, as the runtime's own RoPE computes them
    # (layers/rotary.py): at a few thousand positions that is ~1e-4 off float64.
    tolerance = 5e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(k.cpu(), k_ref.cpu(), atol=tolerance, rtol=tolerance)
    assert torch.equal(v.cpu(), v_ref.cpu())  # values move as they are, bit for bit
    untouched = torch.ones(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    untouched[dst.cpu()] = False
    before_k, _ = cache(dtype, device)
    flat = k.reshape(NUM_BLOCKS * BLOCK_SIZE, HEADS, HEAD_DIM)[untouched.to(device)]
    assert torch.equal(flat, before_k.reshape(-1, HEADS, HEAD_DIM)[untouched.to(device)])


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["rope", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_turned_key_is_the_key_computed_at_its_new_position(
    scaling: RopeScaling | None, dtype: torch.dtype
) -> None:
    """At layer 0 a key is its token's projection turned by its position: computed at p by
    the runtime's RoPE and moved to p', it is the key the runtime computes at p' (to the cache
    dtype's rounding and float32 angles)."""
    inv_freq = inverse_frequencies(HEAD_DIM, 500000.0, scaling)
    torch.manual_seed(2)
    raw = torch.randn(21, HEADS, HEAD_DIM)  # the tokens' projections, before RoPE
    old = torch.randint(0, 4000, (21,))
    new = torch.randint(0, 4000, (21,))

    config = SimpleNamespace(
        head_dim=HEAD_DIM, rope_theta=500000.0, rope_scaling=scaling, max_context_len=4096
    )
    rotary = RotaryEmbedding(cast(Any, config), torch.float32, torch.device("cpu"))

    def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """As the runtime computes a key at these positions."""
        return rotary.rotate(x, rotary.tables(positions))

    for path, device in (("triton", DEVICE), ("cpu", torch.device("cpu"))):
        k, v = cache(dtype, device)
        src = torch.arange(21, device=device)
        dst = 4 * BLOCK_SIZE + torch.arange(21, device=device)
        k[src // BLOCK_SIZE, src % BLOCK_SIZE] = rope(raw, old).to(device, dtype)
        place = place_kv_triton if path == "triton" else place_kv_cpu
        place(k, v, src, dst, (new - old).to(device), inv_freq.to(device))
        moved = k[dst // BLOCK_SIZE, dst % BLOCK_SIZE].float().cpu()
        expected = rope(raw, new)
        tolerance = 1e-3 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(moved, expected, atol=tolerance, rtol=tolerance)


def test_a_delta_of_zero_is_a_plain_copy() -> None:
    k, v = cache(torch.float32, torch.device("cpu"))
    src, dst, _ = moves(torch.device("cpu"))
    place_kv(k, v, src, dst, torch.zeros_like(src), inverse_frequencies(HEAD_DIM, 1e4, None))
    assert torch.equal(
        k[dst // BLOCK_SIZE, dst % BLOCK_SIZE], k[src // BLOCK_SIZE, src % BLOCK_SIZE]
    )


def test_bad_calls_are_refused_before_anything_is_written() -> None:
    k, v = cache(torch.float32, torch.device("cpu"))
    inv_freq = inverse_frequencies(HEAD_DIM, 1e4, None)
    src, dst, deltas = moves(torch.device("cpu"))
    before = k.clone()
    with pytest.raises(ShapeError, match="also a source"):
        place_kv_cpu(k, v, src, torch.cat([dst[:-1], src[:1]]), deltas, inv_freq)
    with pytest.raises(ShapeError, match="written twice"):
        place_kv_cpu(k, v, src, torch.cat([dst[:-1], dst[:1]]), deltas, inv_freq)
    with pytest.raises(ShapeError, match="deltas"):
        place_kv_cpu(k, v, src, dst, deltas[:-1], inv_freq)
    with pytest.raises(ShapeError, match="inv_freq"):
        place_kv_cpu(k, v, src, dst, deltas, inv_freq[:-1])
    assert torch.equal(k, before)
