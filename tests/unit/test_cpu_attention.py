"""The fast CPU attention path against the torch reference, on raw caches and mixed batches."""

import pytest
import torch

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.layers.attention import CpuAttention, ReferenceAttention
from tests.model_specs import TINY_QWEN2

CONFIG = TINY_QWEN2  # 8 q heads over 2 kv heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_equals_reference_on_a_mixed_batch(dtype: torch.dtype) -> None:
    config = ModelConfig.from_hf(CONFIG.hf_config(0, [1], 4))
    torch.manual_seed(0)
    pools = [KVPool.allocate(config, 40, 8, dtype=dtype) for _ in range(2)]
    pools[0].tensor.normal_()
    pools[1].tensor.copy_(pools[0].tensor)
    order = torch.randperm(40).tolist()
    chunks = [
        SequenceChunk([1], 30, order[0:4]),  # decode after 30 cached tokens
        SequenceChunk([1] * 9, 20, order[4:8]),  # chunk after cached context
        SequenceChunk([1], 7, order[8:9]),  # decode, context inside one block
        SequenceChunk([1] * 17, 0, order[9:12]),  # fresh prefill
        SequenceChunk([1], 64, order[12:21]),  # decode, context a block multiple + 1
    ]
    batch = ForwardBatch.build(chunks, config, pools[0])
    tokens, heads = batch.num_tokens, config.num_kv_heads
    q = torch.randn(tokens, config.num_q_heads, config.head_dim).to(dtype)
    k = torch.randn(tokens, heads, config.head_dim).to(dtype)
    v = torch.randn(tokens, heads, config.head_dim).to(dtype)
    outputs = []
    for backend, pool in zip((ReferenceAttention(), CpuAttention()), pools, strict=True):
        k_cache, v_cache = pool.layer(0)
        metadata = backend.prepare(batch, pool.block_size)
        outputs.append(backend.attend(q, k, v, k_cache, v_cache, metadata, 0.125).float())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(outputs[0], outputs[1], atol=tolerance, rtol=tolerance)
    assert torch.equal(pools[0].tensor, pools[1].tensor)  # both stored the same K/V
