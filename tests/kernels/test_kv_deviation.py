"""Deviation of reused KV from freshly computed KV (kernels/kv_deviation.py): the Triton path
(on CUDA where a GPU exists, else in the interpreter) and the CPU path against the float64
reference, and the choice of the tokens to recompute."""

import pytest
import torch

from duetserve.runtime.errors import ShapeError
from duetserve.runtime.kernels.kv_deviation import (
    kv_deviation,
    kv_deviation_cpu,
    kv_deviation_ref,
    kv_deviation_triton,
    to_recompute,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 6, 16, 3, 64


def setup(
    dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A paged cache, 19 reused tokens' slots in it, and their fresh K/V: most close to the
    cached rows, tokens 3 and 11 far from them."""
    torch.manual_seed(0)
    pool = torch.randn(NUM_BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD_DIM).to(device, dtype)
    k_cache, v_cache = pool[:, 0], pool[:, 1]
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE)[:19].to(device)
    blocks, rows = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    noise = 0.01 * torch.randn(2, 19, HEADS, HEAD_DIM).to(device)
    noise[:, 3] *= 100
    noise[:, 11] *= 50
    k_fresh = (k_cache[blocks, rows].float() + noise[0]).to(dtype)
    v_fresh = (v_cache[blocks, rows].float() + noise[1]).to(dtype)
    return k_cache, v_cache, slots, k_fresh, v_fresh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_each_path_matches_the_reference(dtype: torch.dtype, path: str) -> None:
    device = DEVICE if path == "triton" else torch.device("cpu")
    deviation = kv_deviation_triton if path == "triton" else kv_deviation_cpu
    args = setup(dtype, device)
    got = deviation(*args).cpu()
    expected = kv_deviation_ref(*(a.cpu() for a in args))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(to_recompute(got, 2 / 19), torch.tensor([3, 11]))


def test_the_fraction_to_recompute() -> None:
    deviation = kv_deviation(*setup(torch.float32, torch.device("cpu")))
    assert to_recompute(deviation, 0.0).tolist() == []
    assert to_recompute(deviation, 1.0).tolist() == list(range(19))
    assert to_recompute(deviation, 0.05).tolist() == [3]  # ceil(0.95) = 1: the worst
    picked = to_recompute(deviation, 0.15)  # ceil(2.85) = 3, in token order
    assert picked.tolist() == sorted(picked.tolist()) and {3, 11} <= set(picked.tolist())
    assert to_recompute(torch.zeros(4), 0.5).tolist() == [0, 1]  # ties: the earlier
    with pytest.raises(ShapeError):
        to_recompute(deviation, 1.5)


def test_identical_rows_deviate_by_nothing_and_bad_shapes_are_refused() -> None:
    k_cache, v_cache, slots, _, _ = setup(torch.float32, torch.device("cpu"))
    blocks, rows = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    same = kv_deviation_cpu(k_cache, v_cache, slots, k_cache[blocks, rows], v_cache[blocks, rows])
    assert torch.equal(same, torch.zeros(19))
    with pytest.raises(ShapeError, match="k_fresh"):
        kv_deviation_cpu(k_cache, v_cache, slots, k_cache[blocks, rows][:-1], v_cache[0, :19])
