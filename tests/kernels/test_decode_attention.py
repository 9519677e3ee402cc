"""paged_decode_attention against paged_attention_ref with one query row per sequence."""

from collections.abc import Callable

import pytest
import torch

from duetserve.runtime.errors import ShapeError
from duetserve.runtime.kernels.attention_ref import paged_attention_ref
from duetserve.runtime.kernels.decode_attention import paged_decode_attention
from tests.kernels.paged_cache import DEVICE, TOLERANCE, build_paged_cache, on_device, random_query

HEAD_DIM = 32
SCALE = HEAD_DIM**-0.5


def reference(query: torch.Tensor, paged: dict[str, torch.Tensor]) -> torch.Tensor:
    """paged_attention_ref on CPU copies of the kernel's arguments, one query row a sequence."""
    on_cpu = {name: t.cpu() for name, t in paged.items()}
    one_row_each = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    return paged_attention_ref(query.cpu(), **on_cpu, query_start_loc=one_row_each, scale=SCALE)


@pytest.mark.parametrize(
    ("seq_lens", "num_q_heads", "num_kv_heads", "block_size", "dtype"),
    [
        pytest.param([1, 13, 37, 80], 2, 2, 16, torch.float32, id="mha-bs16-ragged"),
        pytest.param([8, 32, 71], 4, 2, 8, torch.float32, id="gqa2-bs8-block-multiples"),
        pytest.param([48, 5], 4, 1, 16, torch.float32, id="gqa4-bs16-block-multiple"),
        pytest.param([1, 29, 64], 4, 2, 16, torch.float16, id="gqa2-float16"),
        pytest.param([17, 40], 2, 1, 8, torch.bfloat16, id="gqa2-bfloat16"),
    ],
)
def test_decode_equals_reference(
    seq_lens: list[int], num_q_heads: int, num_kv_heads: int, block_size: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    k_cache, v_cache, block_tables = build_paged_cache(
        seq_lens, block_size, num_kv_heads, dtype, HEAD_DIM
    )
    query = random_query(len(seq_lens), num_q_heads, dtype, HEAD_DIM)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    paged = on_device(k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=lens)
    ours = paged_decode_attention(query, **paged, scale=SCALE)
    assert ours.dtype == dtype and ours.shape == query.shape
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(ours.cpu(), reference(query, paged), rtol=tolerance, atol=tolerance)


def valid_args() -> dict[str, torch.Tensor]:
    k_cache, v_cache, block_tables = build_paged_cache([5, 20], 8, 2, torch.float32, HEAD_DIM)
    return on_device(
        query=random_query(2, 4, torch.float32, HEAD_DIM),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor([5, 20], dtype=torch.int32),
    )


def every_other_column(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype as t, but with stride 2 in the last dimension."""
    return torch.cat([t, t], dim=-1)[..., ::2]


BAD_ARGUMENTS: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("query dtype differs from cache", "query", lambda t: t.half()),
    ("int64 block tables", "block_tables", lambda t: t.long()),
    ("float seq lens", "seq_lens", lambda t: t.float()),
    ("v_cache dtype differs", "v_cache", lambda t: t.double()),
    ("query heads not a multiple", "query", lambda t: t[:, :3]),
    ("query head dim differs", "query", lambda t: t[..., :16]),
    ("seq lens too long", "seq_lens", lambda t: torch.cat([t, t])),
    ("block tables one dim", "block_tables", lambda t: t.flatten()),
    ("strided query last dim", "query", every_other_column),
    ("strided block tables", "block_tables", every_other_column),
]


@pytest.mark.parametrize(
    ("argument", "spoil"), [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS]
)
def test_decode_refuses_bad_argument(
    argument: str, spoil: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    args = valid_args()
    args[argument] = spoil(args[argument])
    with pytest.raises(ShapeError, match=argument):
        paged_decode_attention(**args, scale=SCALE)


@pytest.mark.parametrize(
    ("block_size", "head_dim", "refused"), [(12, 32, "block_size"), (8, 24, "head_dim")]
)
def test_decode_refuses_cache_geometry(block_size: int, head_dim: int, refused: str) -> None:
    cache = torch.zeros(4, block_size, 2, head_dim, device=DEVICE)  # [N, bs, Hkv, D]
    args = valid_args()
    args["query"] = torch.zeros(2, 4, head_dim, device=DEVICE)
    with pytest.raises(ShapeError, match=refused):
        paged_decode_attention(**{**args, "k_cache": cache, "v_cache": cache}, scale=SCALE)
