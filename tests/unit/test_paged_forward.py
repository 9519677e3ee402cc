"""Forward passes over the paged pool: chunking, prefix reuse, mixed batches, backends, dtypes."""

import pytest
import torch

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.models.llama import LlamaForCausalLM
from tests.conftest import ModelDirs
from tests.model_specs import TINY, TINY_QWEN2

PROMPT = [(13 * i + 5) % 4000 + 10 for i in range(150)]


@pytest.fixture(scope="module")
def model(model_dirs: ModelDirs) -> LlamaForCausalLM:
    return load_model(model_dirs.get(TINY_QWEN2), "float32")


def prefill_logits(model: LlamaForCausalLM, tokens: list[int], chunk_size: int) -> torch.Tensor:
    """Every position's logits, computing the prompt chunk_size tokens at a time."""
    pool = KVPool.allocate(model.config, num_blocks=16, block_size=16)
    table = list(range(15, -1, -1))  # non-contiguous, reversed block order
    pieces = []
    for start in range(0, len(tokens), chunk_size):
        chunk = SequenceChunk(tokens[start : start + chunk_size], start, table, all_logits=True)
        pieces.append(model.forward(ForwardBatch.build([chunk], model.config, pool), pool))
    return torch.cat(pieces)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(model: LlamaForCausalLM, chunk_size: int) -> None:
    one_shot = prefill_logits(model, PROMPT, len(PROMPT))
    chunked = prefill_logits(model, PROMPT, chunk_size)
    assert (chunked - one_shot).abs().max().item() <= 1e-4 * one_shot.abs().max().item()


def test_decoding_after_prefix_reuse_equals_no_reuse(model: LlamaForCausalLM) -> None:
    """Request B shares request A's first 64 tokens (4 full blocks): B reads those blocks and
    computes only its own tail, and its logits equal computing everything from scratch."""
    config = model.config
    pool = KVPool.allocate(config, num_blocks=32, block_size=16)
    prefix, tail_a, tail_b = PROMPT[:64], PROMPT[64:90], PROMPT[100:130]
    table_a = list(range(0, 8))
    model.forward(
        ForwardBatch.build([SequenceChunk(prefix + tail_a, 0, table_a)], config, pool), pool
    )
    table_b = table_a[:4] + list(range(8, 12))  # shared prefix blocks, then B's own
    reused = model.forward(
        ForwardBatch.build([SequenceChunk(tail_b, 64, table_b, all_logits=True)], config, pool),
        pool,
    )
    fresh = prefill_logits(model, prefix + tail_b, len(prefix + tail_b))[64:]
    assert (reused - fresh).abs().max().item() <= 1e-4 * fresh.abs().max().item()


def test_mixed_batch_equals_separate_steps(model: LlamaForCausalLM) -> None:
    """One decode row, one chunk after cached context and one fresh prefill in one batch."""
    config = model.config
    pool = KVPool.allocate(config, num_blocks=48, block_size=16)
    a_table, b_table, c_table = list(range(0, 16)), list(range(16, 32)), list(range(32, 48))
    warm = [SequenceChunk(PROMPT[:40], 0, a_table), SequenceChunk(PROMPT[:70], 0, b_table)]
    model.forward(ForwardBatch.build(warm, config, pool), pool)
    mixed = [
        SequenceChunk([PROMPT[40]], 40, a_table),
        SequenceChunk(PROMPT[70:100], 70, b_table),
        SequenceChunk(PROMPT[:25], 0, c_table),
    ]
    logits = model.forward(ForwardBatch.build(mixed, config, pool), pool)
    expected = torch.stack([prefill_logits(model, PROMPT[:n], n)[-1] for n in (41, 100, 25)])
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_attention_backends_agree(model_dirs: ModelDirs, backend: str) -> None:
    model_dir = model_dirs.get(TINY)
    reference = load_model(model_dir, "float32", attention="reference")
    candidate = load_model(model_dir, "float32", attention=backend)
    chunk = SequenceChunk(PROMPT[:50], 0, list(range(4)), all_logits=True)
    results = []
    for m in (reference, candidate):
        pool = KVPool.allocate(m.config, 4, 16)
        results.append(m.forward(ForwardBatch.build([chunk], m.config, pool), pool))
    assert (results[0] - results[1]).abs().max().item() <= 1e-4 * results[0].abs().max().item()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(model_dirs: ModelDirs, dtype: str) -> None:
    model_dir = model_dirs.get(TINY)
    chunk = SequenceChunk(PROMPT[:40], 0, list(range(4)), all_logits=True)
    logits = {}
    for name in ("float32", dtype):
        m = load_model(model_dir, name)
        pool = KVPool.allocate(m.config, 4, 16, dtype=getattr(torch, name))
        logits[name] = m.forward(ForwardBatch.build([chunk], m.config, pool), pool)
    agree = (logits["float32"].argmax(-1) == logits[dtype].argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_weights_stored_in_bfloat16_load_in_float32(model_dirs: ModelDirs) -> None:
    model = load_model(model_dirs.get(TINY.with_(storage_dtype="bfloat16")), "float32")
    assert model.weights["embed_tokens"].dtype == torch.float32
    pool = KVPool.allocate(model.config, 4, 16)
    logits = model.forward(
        ForwardBatch.build([SequenceChunk([1, 2, 3], 0, [0])], model.config, pool), pool
    )
    assert torch.isfinite(logits).all()
