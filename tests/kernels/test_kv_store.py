"""store_kv against store_kv_ref: each token's K/V lands at its slot and nothing else changes.
On CUDA tensors where a GPU exists, else in the Triton interpreter (see tests/conftest.py)."""

from collections.abc import Callable

import pytest
import torch

from duetserve.runtime.errors import ShapeError
from duetserve.runtime.kernels.attention_ref import store_kv_ref
from duetserve.runtime.kernels.kv_store import store_kv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_BLOCKS = 6
NUM_KV_HEADS = 2
HEAD_DIM = 32


def random_rows(num_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value [T, Hkv, D], strided as the K and V parts of one fused qkv projection."""
    qkv = torch.randn(num_tokens, 3 * NUM_KV_HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    return qkv[:, NUM_KV_HEADS : 2 * NUM_KV_HEADS], qkv[:, 2 * NUM_KV_HEADS :]


def random_cache(block_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches [N, bs, Hkv, D], interleaved per block in one pool (non-contiguous)."""
    pool = torch.randn(NUM_BLOCKS, 2, block_size, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    pool = pool.to(dtype)  # [N, 2, bs, Hkv, D]
    return pool[:, 0], pool[:, 1]


def run_both(
    block_size: int, key_dtype: torch.dtype, cache_dtype: torch.dtype, index_dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(kernel caches, reference caches) after storing 21 tokens at random distinct slots."""
    torch.manual_seed(0)
    key, value = random_rows(21, key_dtype)
    slot_mapping = torch.randperm(NUM_BLOCKS * block_size, device=DEVICE)[:21].to(index_dtype)
    k_cache, v_cache = random_cache(block_size, cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slot_mapping)
    store_kv_ref(key, value, k_ref, v_ref, slot_mapping)
    return (k_cache, v_cache), (k_ref, v_ref)


@pytest.mark.parametrize(
    ("block_size", "key_dtype", "cache_dtype", "index_dtype"),
    [
        (16, torch.float32, torch.float32, torch.int64),
        (8, torch.float32, torch.float32, torch.int32),
        (16, torch.float16, torch.float16, torch.int32),
        (8, torch.bfloat16, torch.bfloat16, torch.int64),
        (16, torch.float32, torch.float16, torch.int64),
    ],
)
def test_store_kv_equals_reference(
    block_size: int, key_dtype: torch.dtype, cache_dtype: torch.dtype, index_dtype: torch.dtype
) -> None:
    ours, reference = run_both(block_size, key_dtype, cache_dtype, index_dtype)
    assert torch.equal(ours[0], reference[0])
    assert torch.equal(ours[1], reference[1])


def test_store_kv_casts_float32_into_bfloat16() -> None:
    # The interpreter truncates float32 to bfloat16 where torch and the GPU round to nearest:
    # allow one bfloat16 step (2**-7 relative).
    ours, reference = run_both(16, torch.float32, torch.bfloat16, torch.int64)
    torch.testing.assert_close(ours[0], reference[0], rtol=2**-7, atol=0.0)
    torch.testing.assert_close(ours[1], reference[1], rtol=2**-7, atol=0.0)


def test_store_kv_with_no_tokens_writes_nothing() -> None:
    key, value = random_rows(0, torch.float32)
    k_cache, v_cache = random_cache(16, torch.float32)
    before = k_cache.clone()
    store_kv(key, value, k_cache, v_cache, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(k_cache, before)


def valid_args() -> dict[str, torch.Tensor]:
    key, value = random_rows(5, torch.float32)
    k_cache, v_cache = random_cache(16, torch.float32)
    slot_mapping = torch.arange(5, dtype=torch.int64, device=DEVICE)
    return dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def every_other_column(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype as t, but with stride 2 in the last dimension."""
    return torch.cat([t, t], dim=-1)[..., ::2]


BAD_ARGUMENTS: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("float slot mapping", "slot_mapping", lambda t: t.float()),
    ("integer key", "key", lambda t: t.to(torch.int32)),
    ("v_cache dtype differs", "v_cache", lambda t: t.half()),
    ("too many heads", "key", lambda t: torch.cat([t, t], dim=1)),
    ("slot mapping too short", "slot_mapping", lambda t: t[:4]),
    ("value token count differs", "value", lambda t: t[:4]),
    ("cache without head dim", "k_cache", lambda t: t.flatten(2)),
    ("strided key last dim", "key", every_other_column),
    ("strided v_cache last dim", "v_cache", every_other_column),
]


@pytest.mark.parametrize(
    ("argument", "spoil"), [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS]
)
def test_store_kv_refuses_bad_argument(
    argument: str, spoil: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    args = valid_args()
    args[argument] = spoil(args[argument])
    with pytest.raises(ShapeError, match=argument):
        store_kv(**args)


def test_store_kv_refuses_non_power_of_two_block_size() -> None:
    args = valid_args()
    args["k_cache"] = args["v_cache"] = torch.zeros(4, 12, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    with pytest.raises(ShapeError, match="block_size"):
        store_kv(**args)
