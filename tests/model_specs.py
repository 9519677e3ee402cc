"""Model shapes the tests generate."""

from duetserve.runtime.generator.spec import PRESETS

TINY = PRESETS["tiny"]
# Qwen2 style: q/k/v bias, tied embeddings, grouped-query attention (8 q heads over 2 kv heads).
TINY_QWEN2 = TINY.with_(
    name="tiny-qwen2", architecture="qwen2", qkv_bias=True, tie_word_embeddings=True, num_kv_heads=2
)
TINY_LLAMA3 = TINY.with_(name="tiny-llama3", llama3_rope_scaling=True, rope_theta=500000.0)
TINY_MISTRAL = TINY.with_(name="tiny-mistral", architecture="mistral")
