"""cpu_paged_decode_attention and cpu_paged_prefill_attention (the fused C kernels) against
paged_attention_ref, their refusals, the compile cache, and CpuAttention's fallback when the
kernels cannot be built."""

import ctypes
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.errors import BlockTableError, ShapeError
from duetserve.runtime.kernels.attention_ref import paged_attention_ref
from duetserve.runtime.kernels.cpu.build import (
    DEFAULT_FLAGS,
    CompilerOptions,
    KernelUnavailable,
    build_library,
)
from duetserve.runtime.kernels.cpu_decode_attention import (
    DEFAULT_OPTIONS,
    SOURCE,
    PagedDecodeCall,
    cpu_kernels_available,
    cpu_paged_decode_attention,
    cpu_paged_prefill_attention,
)
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.layers.attention import AttentionBackend, CpuAttention, ReferenceAttention
from tests.kernels.paged_cache import build_paged_cache
from tests.model_specs import TINY_QWEN2

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SEQ_LENS = [1, 13, 37, 80]  # a one-token context, lengths off and on block multiples

needs_kernel = pytest.mark.skipif(not cpu_kernels_available()[0], reason=cpu_kernels_available()[1])


def random_query(
    num_seqs: int, num_q_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Query [B, Hq, D] on the CPU, strided as the Q part of a fused qkv projection."""
    return torch.randn(num_seqs, 2 * num_q_heads, head_dim).to(dtype)[:, :num_q_heads]


def check_against_reference(
    seq_lens: list[int],
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_kv_heads: int = 2,
    num_threads: int | None = None,
    options: CompilerOptions = DEFAULT_OPTIONS,
) -> None:
    torch.manual_seed(0)
    k_cache, v_cache, tables = build_paged_cache(
        seq_lens, block_size, num_kv_heads, dtype, head_dim
    )  # unused slots hold NaN: reading one shows
    query = random_query(len(seq_lens), group * num_kv_heads, head_dim, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    ours = cpu_paged_decode_attention(
        query, k_cache, v_cache, tables, lens, scale, num_threads=num_threads, options=options
    )
    one_row_each = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    cache = (k_cache, v_cache, tables)
    assert_equals_reference(ours, query, cache, one_row_each, lens, scale)


def assert_equals_reference(
    ours: torch.Tensor,
    query: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # k_cache, v_cache, block_tables
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    expected = paged_attention_ref(query, *cache, query_start_loc, seq_lens, scale)
    assert ours.dtype == query.dtype and ours.shape == query.shape
    tolerance = TOLERANCE[query.dtype]
    torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("group", [1, 2, 3, 4], ids=lambda g: f"gqa{g}")
def test_decode_equals_reference(
    group: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    check_against_reference(SEQ_LENS, group, head_dim, block_size, dtype)


@needs_kernel
@pytest.mark.parametrize(
    ("group", "head_dim", "num_threads"),
    [
        pytest.param(9, 64, None, id="group-over-8-heads"),
        pytest.param(3, 80, None, id="head-dim-80"),
        pytest.param(3, 16, None, id="head-dim-16"),
        pytest.param(2, 64, 1, id="one-thread"),
        pytest.param(2, 64, 3, id="three-threads"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_decode_odd_shapes(
    group: int, head_dim: int, num_threads: int | None, dtype: torch.dtype
) -> None:
    check_against_reference(SEQ_LENS, group, head_dim, 16, dtype, num_threads=num_threads)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_decode_many_sequences(dtype: torch.dtype) -> None:
    """Enough sequences that a work item takes all kv heads of one."""
    seq_lens = [1 + 7 * i for i in range(12)]
    check_against_reference(seq_lens, 3, 64, 16, dtype, num_kv_heads=4, num_threads=2)


@needs_kernel
def test_decode_wide_groups() -> None:
    """64 q heads of 256 per KV head: a work item cannot hold all four KV heads."""
    check_against_reference([3, 17, 9, 30] * 3, 64, 256, 16, torch.float32, num_kv_heads=4)


def check_prefill_against_reference(
    context_len: int,
    num_queries: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    num_threads: int | None = None,
    options: CompilerOptions = DEFAULT_OPTIONS,
) -> None:
    """The last num_queries tokens of a context_len context, against the reference."""
    torch.manual_seed(0)
    k_cache, v_cache, tables = build_paged_cache([context_len], block_size, 2, dtype, head_dim)
    query = random_query(num_queries, group * 2, head_dim, dtype)
    scale = head_dim**-0.5
    ours = cpu_paged_prefill_attention(
        query,
        k_cache,
        v_cache,
        tables[0],
        context_len,
        scale,
        num_threads=num_threads,
        options=options,
    )
    starts = torch.tensor([0, num_queries], dtype=torch.int32)
    lens = torch.tensor([context_len], dtype=torch.int32)
    assert_equals_reference(ours, query, (k_cache, v_cache, tables), starts, lens, scale)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("group", [1, 3, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize(
    ("context_len", "num_queries"),
    [(37, 37), (80, 80), (50, 13), (33, 1), (1, 1)],
    ids=["prompt-37", "prompt-80", "chunk-13-after-37", "one-after-32", "one-token"],
)
def test_prefill_equals_reference(
    context_len: int,
    num_queries: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    check_prefill_against_reference(context_len, num_queries, group, head_dim, dtype, block_size)


@needs_kernel
@pytest.mark.parametrize(
    ("group", "head_dim", "num_threads", "context_len"),
    [
        pytest.param(9, 64, None, 70, id="group-over-8-heads"),
        pytest.param(3, 80, None, 45, id="head-dim-80"),
        pytest.param(3, 16, None, 45, id="head-dim-16"),
        pytest.param(64, 256, None, 40, id="query-tile-of-one-token"),
        pytest.param(2, 64, 1, 300, id="one-thread"),
        pytest.param(2, 64, 3, 300, id="three-threads"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_prefill_odd_shapes(
    group: int, head_dim: int, num_threads: int | None, context_len: int, dtype: torch.dtype
) -> None:
    check_prefill_against_reference(
        context_len, context_len, group, head_dim, dtype, num_threads=num_threads
    )


# The kernels built without AVX512_BF16: bfloat16 widened to float32 and multiplied by FMAs,
# the path of CPUs without the extension, kept tested on those with it.
WIDENING = CompilerOptions(flags=(*DEFAULT_FLAGS, "-mno-avx512bf16"))
on_x86 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512bf16 is an x86 flag"
)


@needs_kernel
@pytest.mark.parametrize(
    "options",
    [DEFAULT_OPTIONS, pytest.param(WIDENING, marks=on_x86)],
    ids=["as-built", "without-bf16-dot-products"],
)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
def test_bfloat16_decode_and_prefill_equal_reference_either_way(
    head_dim: int, options: CompilerOptions
) -> None:
    """As built here, head_dims of whole 32-value registers take vdpbf16ps where the CPU has it
    (P rounded to bfloat16); the other build must agree with the reference as well."""
    check_against_reference(SEQ_LENS, 3, head_dim, 16, torch.bfloat16, options=options)
    for context_len, num_queries in ((80, 80), (50, 13)):
        check_prefill_against_reference(
            context_len, num_queries, 3, head_dim, torch.bfloat16, options=options
        )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "positions",
    [[0, 3, 4, 5, 40, 41, 69], list(range(1, 70, 2)), [69]],
    ids=["scattered", "every-other-two-tiles", "last-only"],
)
def test_prefill_at_given_positions_equals_reference(
    positions: list[int], dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    context_len = positions[-1] + 1
    k_cache, v_cache, tables = build_paged_cache([context_len], 16, 2, dtype, 64)
    query = random_query(len(positions), 6, 64, dtype)
    where = torch.tensor(positions, dtype=torch.int64)
    ours = cpu_paged_prefill_attention(
        query, k_cache, v_cache, tables[0], context_len, 0.125, positions=where
    )
    starts = torch.tensor([0, len(positions)], dtype=torch.int32)
    lens = torch.tensor([context_len], dtype=torch.int32)
    expected = paged_attention_ref(query, k_cache, v_cache, tables, starts, lens, 0.125, where)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance)


@needs_kernel
def test_prefill_refuses_positions_out_of_order_or_short_of_the_context() -> None:
    k_cache, v_cache, tables = build_paged_cache([20], 8, 2, torch.float32, 32)
    query = random_query(3, 4, 32, torch.float32)
    for bad in ([1, 1, 19], [5, 3, 19], [-1, 3, 19], [1, 2, 18]):
        where = torch.tensor(bad, dtype=torch.int64)
        with pytest.raises(BlockTableError):
            cpu_paged_prefill_attention(
                query, k_cache, v_cache, tables[0], 20, 0.1, positions=where
            )


@needs_kernel
def test_prefill_refuses_what_lies_outside_the_table_or_pool() -> None:
    k_cache, v_cache, tables = build_paged_cache([20], 8, 2, torch.float32, 32)
    query = random_query(5, 4, 32, torch.float32)
    table = tables[0]  # 3 blocks: 24 positions
    with pytest.raises(BlockTableError, match="context_len"):
        cpu_paged_prefill_attention(query, k_cache, v_cache, table, 25, 0.1)
    with pytest.raises(BlockTableError, match="context_len"):
        cpu_paged_prefill_attention(query, k_cache, v_cache, table, 4, 0.1)  # fewer than n
    with pytest.raises(BlockTableError, match="block id"):
        cpu_paged_prefill_attention(query, k_cache, v_cache, table + 1000, 20, 0.1)
    with pytest.raises(ShapeError, match="block_table"):
        cpu_paged_prefill_attention(query, k_cache, v_cache, table.long(), 20, 0.1)
    with pytest.raises(ShapeError, match="query"):
        cpu_paged_prefill_attention(query.bfloat16(), k_cache, v_cache, table, 20, 0.1)
    with pytest.raises(ShapeError, match="out"):
        out = torch.empty(5, 4, 16)
        cpu_paged_prefill_attention(query, k_cache, v_cache, table, 20, 0.1, out=out)


def valid_args() -> dict[str, torch.Tensor]:
    k_cache, v_cache, block_tables = build_paged_cache([5, 20], 8, 2, torch.float32, 32)
    return {
        "query": random_query(2, 4, 32, torch.float32),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": block_tables,
        "seq_lens": torch.tensor([5, 20], dtype=torch.int32),
    }


def run_kernel(
    args: dict[str, torch.Tensor], options: CompilerOptions = DEFAULT_OPTIONS
) -> torch.Tensor:
    query, k_cache, v_cache = args["query"], args["k_cache"], args["v_cache"]
    tables, lens = args["block_tables"], args["seq_lens"]
    return cpu_paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.1, options=options)


def every_other_column(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype as t, but with stride 2 in the last dimension."""
    return torch.cat([t, t], dim=-1)[..., ::2]


BAD_ARGUMENTS: list[tuple[str, type[Exception], str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("query dtype differs", ShapeError, "query", lambda t: t.bfloat16()),
    ("float16 cache", ShapeError, "k_cache", lambda t: t.half()),
    ("int64 block tables", ShapeError, "block_tables", lambda t: t.long()),
    ("float seq lens", ShapeError, "seq_lens", lambda t: t.float()),
    ("query heads not a multiple", ShapeError, "query", lambda t: t[:, :3]),
    ("query head dim differs", ShapeError, "query", lambda t: t[..., :16]),
    ("seq lens too many", ShapeError, "seq_lens", lambda t: torch.cat([t, t])),
    ("strided query", ShapeError, "query", every_other_column),
    ("strided block tables", ShapeError, "block_tables", every_other_column),
    ("seq len past the table", BlockTableError, "seq_lens", lambda t: t + 100),
    ("empty context", BlockTableError, "seq_lens", lambda t: t * 0),
    ("block id outside the pool", BlockTableError, "block_tables", lambda t: t + 1000),
]


@needs_kernel
@pytest.mark.parametrize(
    ("error", "argument", "spoil"),
    [c[1:] for c in BAD_ARGUMENTS],
    ids=[c[0] for c in BAD_ARGUMENTS],
)
def test_decode_refuses_bad_argument(
    error: type[Exception], argument: str, spoil: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    args = valid_args()
    if argument == "k_cache":
        args["v_cache"] = spoil(args["v_cache"])
    args[argument] = spoil(args[argument])
    with pytest.raises(error, match=argument):
        run_kernel(args)


@needs_kernel
def test_a_call_checked_once_serves_every_layer_alike_and_refuses_another_layout() -> None:
    """PagedDecodeCall checks the first layer's tensors; later layers pass only addresses, so
    one laid out differently must be refused before the kernel reads it."""
    args = valid_args()
    other = {name: torch.randn_like(args[name]) for name in ("k_cache", "v_cache")}
    other["query"] = random_query(2, 4, 32, torch.float32)  # strided as the first
    tables, lens = args["block_tables"], args["seq_lens"]
    call = PagedDecodeCall(args["query"], args["k_cache"], args["v_cache"], tables, lens, 0.1)
    for layer in (args, other, args):
        expected = run_kernel({**layer, "block_tables": tables, "seq_lens": lens})
        got = call(layer["query"], layer["k_cache"], layer["v_cache"])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ShapeError, match="laid out otherwise"):
        call(every_other_column(args["query"]), args["k_cache"], args["v_cache"])
    fewer_blocks = args["k_cache"][:-1]
    with pytest.raises(ShapeError, match="laid out otherwise"):
        call(args["query"], fewer_blocks, fewer_blocks)
    with pytest.raises(ShapeError, match="laid out otherwise"):
        call(args["query"].bfloat16(), args["k_cache"].bfloat16(), args["v_cache"].bfloat16())


@pytest.mark.parametrize(
    ("block_size", "head_dim", "refused"), [(12, 32, "block_size"), (8, 24, "head_dim")]
)
def test_decode_refuses_cache_geometry(block_size: int, head_dim: int, refused: str) -> None:
    cache = torch.zeros(4, block_size, 2, head_dim)  # [N, bs, Hkv, D]
    args = valid_args()
    args["query"] = torch.zeros(2, 4, head_dim)
    with pytest.raises(ShapeError, match=refused):
        run_kernel({**args, "k_cache": cache, "v_cache": cache})


def test_missing_compiler_is_reported(tmp_path: Path) -> None:
    options = CompilerOptions(compiler=str(tmp_path / "no-such-cc"), cache_dir=tmp_path)
    available, reason = cpu_kernels_available(options)
    assert not available and reason.startswith("unavailable:") and "no-such-cc" in reason
    with pytest.raises(KernelUnavailable, match="no-such-cc"):
        run_kernel(valid_args(), options)


def test_failing_compiler_is_reported(tmp_path: Path) -> None:
    options = CompilerOptions(compiler="false", cache_dir=tmp_path)
    with pytest.raises(KernelUnavailable, match="failed with status 1"):
        build_library(SOURCE, options)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no library, no temporary


@needs_kernel
def test_a_changed_header_builds_the_sources_that_include_it_again(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    source = folder / "answer.c"
    source.write_text('#include "value.h"\nint answer(void) { return VALUE; }\n')
    (folder / "value.h").write_text("#define VALUE 41\n")
    options = CompilerOptions(cache_dir=tmp_path / "cache")
    first = build_library(source, options)
    (folder / "value.h").write_text("#define VALUE 42\n")
    second = build_library(source, options)
    assert first != second
    assert ctypes.CDLL(str(first)).answer() == 41 and ctypes.CDLL(str(second)).answer() == 42


@needs_kernel
def test_concurrent_builds_share_one_library(tmp_path: Path) -> None:
    options = CompilerOptions(cache_dir=tmp_path)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: build_library(SOURCE, options), range(2)))
    assert paths[0] == paths[1] and paths[0].exists()
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]  # no temporaries
    assert build_library(SOURCE, options) == paths[0]


@pytest.mark.parametrize(
    "kernels",
    [None, CompilerOptions(compiler="/nonexistent/cc")],
    ids=["sdpa-asked-for", "sdpa-no-compiler"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_attention_falls_back_to_sdpa(
    kernels: CompilerOptions | None, dtype: torch.dtype
) -> None:
    backend = CpuAttention(kernels)
    assert not backend.fused
    check_backend_on_mixed_batch(backend, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_attention_fused_mixed_batch(dtype: torch.dtype) -> None:
    """Decode rows, a prompt and a chunk after a prefix, by the kernels."""
    backend = CpuAttention()
    assert backend.fused
    check_backend_on_mixed_batch(backend, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_attention_fused_decode_only_batch(dtype: torch.dtype) -> None:
    backend = CpuAttention()
    assert backend.fused
    check_backend_on_mixed_batch(backend, dtype, decode_only=True)


def check_backend_on_mixed_batch(
    backend: CpuAttention, dtype: torch.dtype, decode_only: bool = False
) -> None:
    config = ModelConfig.from_hf(TINY_QWEN2.hf_config(0, [1], 4))
    torch.manual_seed(0)
    pools = [KVPool.allocate(config, 40, 8, dtype=dtype) for _ in range(2)]
    pools[0].tensor.normal_()
    pools[1].tensor.copy_(pools[0].tensor)
    order = torch.randperm(40).tolist()
    chunks = [SequenceChunk([1], 30, order[0:4]), SequenceChunk([1], 7, order[8:9])]
    if not decode_only:  # a chunk after a 20-token prefix, a whole 12-token prompt, and
        # tokens at scattered positions of an 18-token context (KVShare's recomputation)
        chunks.insert(1, SequenceChunk([1] * 9, 20, order[4:8]))
        chunks.append(SequenceChunk([1] * 12, 0, order[9:11]))
        chunks.append(SequenceChunk.scattered([1] * 5, [2, 5, 9, 10, 17], order[11:14]))
    batch = ForwardBatch.build(chunks, config, pools[0])
    shape = (batch.num_tokens, -1, config.head_dim)
    q = torch.randn(batch.num_tokens, config.num_q_heads * config.head_dim).to(dtype).view(shape)
    k, v = torch.randn(2, batch.num_tokens, config.kv_size).to(dtype).view(2, *shape).unbind()
    outputs = []
    attentions: tuple[AttentionBackend, ...] = (ReferenceAttention(), backend)
    for attention, pool in zip(attentions, pools, strict=True):
        k_cache, v_cache = pool.layer(0)
        metadata = attention.prepare(batch, pool.block_size)
        outputs.append(attention.attend(q, k, v, k_cache, v_cache, metadata, 0.125))
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=tolerance, atol=tolerance)
