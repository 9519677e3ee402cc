"""paged_prefill_attention against paged_attention_ref: prefill, chunked prefill, mixed batches."""

from collections.abc import Callable

import pytest
import torch

from duetserve.runtime.errors import ShapeError
from duetserve.runtime.kernels.attention_ref import paged_attention_ref
from duetserve.runtime.kernels.prefill_attention import paged_prefill_attention
from tests.kernels.paged_cache import DEVICE, TOLERANCE, build_paged_cache, on_device, random_query

HEAD_DIM = 32
SCALE = HEAD_DIM**-0.5


def paged_args(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
) -> dict[str, torch.Tensor]:
    """The kernel's cache and batch-layout arguments, on DEVICE."""
    return on_device(
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        query_start_loc=query_start_loc(query_lens),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
    )


def reference(query: torch.Tensor, paged: dict[str, torch.Tensor]) -> torch.Tensor:
    """paged_attention_ref on CPU copies of the kernel's arguments."""
    on_cpu = {name: t.cpu() for name, t in paged.items()}
    return paged_attention_ref(query.cpu(), **on_cpu, scale=SCALE)


def query_start_loc(query_lens: list[int]) -> torch.Tensor:  # int32 [B + 1]
    return torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)


CASES = [
    # (query_lens, seq_lens, num_q_heads, num_kv_heads, block_size, dtype)
    pytest.param([1, 40, 17], [20, 70, 17], 2, 2, 16, torch.float32, id="mixed-mha-bs16"),
    pytest.param([1, 40, 17], [20, 70, 17], 4, 2, 8, torch.float32, id="mixed-gqa2-bs8"),
    pytest.param([16, 32], [32, 32], 4, 1, 8, torch.float32, id="block-multiples-gqa4"),
    pytest.param([80], [80], 2, 1, 16, torch.float32, id="two-query-tiles"),
    pytest.param([3, 26], [50, 26], 4, 2, 16, torch.float16, id="mixed-float16"),
    pytest.param([1, 24], [9, 61], 2, 1, 8, torch.bfloat16, id="mixed-bfloat16"),
]


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "num_q_heads", "num_kv_heads", "block_size", "dtype"), CASES
)
def test_prefill_equals_reference(
    query_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    k_cache, v_cache, block_tables = build_paged_cache(
        seq_lens, block_size, num_kv_heads, dtype, HEAD_DIM
    )
    query = random_query(sum(query_lens), num_q_heads, dtype, HEAD_DIM)
    paged = paged_args(k_cache, v_cache, block_tables, query_lens, seq_lens)
    ours = paged_prefill_attention(query, **paged, scale=SCALE, max_query_len=max(query_lens))
    assert ours.dtype == dtype and ours.shape == query.shape
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(ours.cpu(), reference(query, paged), rtol=tolerance, atol=tolerance)


def test_prefill_accepts_a_loose_max_query_len() -> None:
    # A bound above the longest chunk only launches tiles that exit at once.
    torch.manual_seed(0)
    k_cache, v_cache, block_tables = build_paged_cache([12, 7], 8, 1, torch.float32, HEAD_DIM)
    query = random_query(9, 2, torch.float32, HEAD_DIM)
    paged = paged_args(k_cache, v_cache, block_tables, [2, 7], [12, 7])
    ours = paged_prefill_attention(query, **paged, scale=SCALE, max_query_len=9)
    torch.testing.assert_close(ours.cpu(), reference(query, paged), rtol=1e-5, atol=1e-5)


def valid_args() -> dict[str, torch.Tensor]:
    k_cache, v_cache, block_tables = build_paged_cache([5, 20], 8, 2, torch.float32, HEAD_DIM)
    paged = paged_args(k_cache, v_cache, block_tables, [4, 5], [5, 20])
    return {"query": random_query(9, 4, torch.float32, HEAD_DIM), **paged}


def every_other_column(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype as t, but with stride 2 in the last dimension."""
    return torch.cat([t, t], dim=-1)[..., ::2]


BAD_ARGUMENTS: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("query dtype differs from cache", "query", lambda t: t.to(torch.bfloat16)),
    ("int64 query start loc", "query_start_loc", lambda t: t.long()),
    ("int64 seq lens", "seq_lens", lambda t: t.long()),
    ("query heads not a multiple", "query", lambda t: t[:, :3]),
    ("query start loc too short", "query_start_loc", lambda t: t[:2]),
    ("block tables rows differ", "block_tables", lambda t: t[:1]),
    ("seq lens two dims", "seq_lens", lambda t: t[None]),
    ("k_cache three dims", "k_cache", lambda t: t[0]),
    ("strided query last dim", "query", every_other_column),
    ("strided k_cache last dim", "k_cache", every_other_column),
]


@pytest.mark.parametrize(
    ("argument", "spoil"), [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS]
)
def test_prefill_refuses_bad_argument(
    argument: str, spoil: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    args = valid_args()
    args[argument] = spoil(args[argument])
    with pytest.raises(ShapeError, match=argument):
        paged_prefill_attention(**args, scale=SCALE, max_query_len=5)


@pytest.mark.parametrize("max_query_len", [0, 10])
def test_prefill_refuses_max_query_len_outside_tokens(max_query_len: int) -> None:
    with pytest.raises(ShapeError, match="max_query_len"):
        paged_prefill_attention(**valid_args(), scale=SCALE, max_query_len=max_query_len)


@pytest.mark.parametrize(
    ("block_size", "head_dim", "refused"),
    [(12, 32, "block_size"), (8, 48, "head_dim"), (8, 8, "head_dim")],
)
def test_prefill_refuses_cache_geometry(block_size: int, head_dim: int, refused: str) -> None:
    cache = torch.zeros(4, block_size, 2, head_dim, device=DEVICE)  # [N, bs, Hkv, D]
    args = {**valid_args(), "k_cache": cache, "v_cache": cache}
    args["query"] = torch.zeros(9, 4, head_dim, device=DEVICE)
    with pytest.raises(ShapeError, match=refused):
        paged_prefill_attention(**args, scale=SCALE, max_query_len=5)


SCATTERED_CASES = [
    # (positions per sequence, seq_lens, num_q_heads, num_kv_heads, block_size, dtype)
    pytest.param([[3, 9, 10, 39], [0, 5, 69]], [40, 70], 4, 2, 8, torch.float32, id="gqa2-bs8"),
    pytest.param([[*range(2, 90, 3), 99]], [100], 2, 1, 16, torch.float32, id="tiles"),
    pytest.param([[7, 8, 30, 31], [12]], [32, 13], 2, 2, 16, torch.bfloat16, id="bfloat16"),
]


@pytest.mark.parametrize(
    ("positions", "seq_lens", "num_q_heads", "num_kv_heads", "block_size", "dtype"),
    SCATTERED_CASES,
)
def test_scattered_rows_equal_the_same_rows_of_a_whole_prefill(
    positions: list[list[int]],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    # KVShare's selective recomputation: rows at chosen positions of a context. Each must equal
    # its row of a prefill of the whole context (every position a query) with the same queries.
    torch.manual_seed(0)
    k_cache, v_cache, block_tables = build_paged_cache(
        seq_lens, block_size, num_kv_heads, dtype, HEAD_DIM
    )
    whole_query = random_query(sum(seq_lens), num_q_heads, dtype, HEAD_DIM)
    whole = paged_args(k_cache, v_cache, block_tables, seq_lens, seq_lens)
    expected = reference(whole_query, whole)
    starts = [0, *torch.tensor(seq_lens).cumsum(0).tolist()]
    picked = [starts[b] + p for b, rows in enumerate(positions) for p in rows]
    query = whole_query[picked]
    flat = torch.tensor([p for rows in positions for p in rows], dtype=torch.int64)
    paged = paged_args(k_cache, v_cache, block_tables, [len(r) for r in positions], seq_lens)
    tolerance = TOLERANCE[dtype]
    ref = paged_attention_ref(
        query.cpu(), **{n: t.cpu() for n, t in paged.items()}, scale=SCALE, positions=flat
    )
    torch.testing.assert_close(ref, expected[picked], rtol=tolerance, atol=tolerance)
    ours = paged_prefill_attention(
        query,
        **paged,
        scale=SCALE,
        max_query_len=max(len(r) for r in positions),
        positions=flat.to(DEVICE),
    )
    torch.testing.assert_close(ours.cpu(), expected[picked], rtol=tolerance, atol=tolerance)
