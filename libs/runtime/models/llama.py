"""The Llama family (Llama, Llama 3.x, Mistral, Qwen2) over the paged KV pool.

One decoder stack serves all of them: they differ only in q/k/v bias, tied embeddings, grouped
query attention and RoPE scaling, which the config carries. Weights arrive in the runtime layout
(weights.py), already loaded by whoever owns them; the linear ones may be oneDNN-packed
(layers/prepack.py), and then every matmul goes through oneDNN.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from duetserve.runtime.batch import ForwardBatch
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.errors import UnsupportedModelError
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.layers.attention import AttentionBackend
from duetserve.runtime.layers.linear import pick_linear
from duetserve.runtime.layers.norm import rms_norm
from duetserve.runtime.layers.prepack import is_packed
from duetserve.runtime.layers.rotary import RotaryEmbedding
from duetserve.runtime.weights import Weights

# Sees a layer's rotated q [T, Hq, D], k [T, Hkv, D] and v [T, Hkv, D], and that layer's caches
# before the rows' K/V are stored in them.
KVProbe = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Step(NamedTuple):
    metadata: object  # the attention backend's, for the batch
    rope: tuple[torch.Tensor, torch.Tensor]  # rotary tables at the batch's positions


class LlamaForCausalLM:
    def __init__(self, config: ModelConfig, weights: Weights, attention: AttentionBackend) -> None:
        embed = weights["embed_tokens"]
        self.config = config
        self.weights = weights
        self.attention = attention
        self.dtype = embed.dtype
        self.device = embed.device
        self.scale = config.head_dim**-0.5
        self.rotary = RotaryEmbedding(config, self.dtype, self.device)
        self.linear = pick_linear(self.device, self.dtype, packed=is_packed(weights))
        self.layers = [_LayerWeights.of(weights, i, config) for i in range(config.num_layers)]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool) -> torch.Tensor:
        """Run one step; returns logits [len(batch.logits_indices), V] in float32."""
        step = self.prepare(batch, pool)
        residual = self.embed(batch.input_ids)
        for index in range(len(self.layers)):
            residual = self.layer(index, residual, step, pool)
        return self.logits(residual[batch.logits_indices])

    # The pieces of a forward pass, for callers that run layers over different rows
    # (KVShare's selective recomputation, runtime/kv_reuse.py).

    def prepare(self, batch: ForwardBatch, pool: KVPool) -> "Step":
        """What every layer of a pass over `batch` needs, made once."""
        pool.check_compatible(self.config, self.dtype)
        metadata = self.attention.prepare(batch, pool.block_size)
        return Step(metadata, self.rotary.tables(batch.positions))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weights["embed_tokens"])  # [T, H]

    def layer(
        self,
        index: int,
        residual: torch.Tensor,  # [T, H]: the residual stream entering the layer
        step: "Step",
        pool: KVPool,
        probe: "KVProbe | None" = None,
    ) -> torch.Tensor:  # [T, H]: the residual stream leaving it
        """One decoder layer: stores the rows' K/V at their slots (first showing them to
        `probe`, when given, while the pool still holds what was there) and attends."""
        layer = self.layers[index]
        k_cache, v_cache = pool.layer(index)
        hidden = rms_norm(residual, layer.input_norm, self.config.rms_norm_eps)
        hidden = self._attention(layer, hidden, step.rope, k_cache, v_cache, step.metadata, probe)
        residual = residual + hidden
        hidden = rms_norm(residual, layer.post_attention_norm, self.config.rms_norm_eps)
        return residual + self._mlp(layer, hidden)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] in float32 of residual rows [R, H] leaving the last layer."""
        hidden = rms_norm(rows, self.weights["final_norm"], self.config.rms_norm_eps)
        return self.linear(hidden, self.weights["lm_head"], None).float()

    def _attention(
        self,
        layer: "_LayerWeights",
        hidden: torch.Tensor,  # [T, H]
        rope: tuple[torch.Tensor, torch.Tensor],  # the step's rotary tables
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: object,
        probe: "KVProbe | None" = None,
    ) -> torch.Tensor:
        c = self.config
        qkv = self.linear(hidden, layer.qkv_proj, layer.qkv_bias)  # [T, Q + 2 KV]
        qk, v = qkv.split([c.q_size + c.kv_size, c.kv_size], dim=-1)
        qk = self.rotary.rotate(qk.view(-1, c.num_q_heads + c.num_kv_heads, c.head_dim), rope)
        q, k = qk.split([c.num_q_heads, c.num_kv_heads], dim=1)  # [T, Hq, D], [T, Hkv, D]
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if probe is not None:
            probe(q, k, v, k_cache, v_cache)
        out = self.attention.attend(q, k, v, k_cache, v_cache, metadata, self.scale)
        return self.linear(out.reshape(-1, c.q_size), layer.o_proj, None)  # [T, H]

    def _mlp(self, layer: "_LayerWeights", hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(hidden, layer.gate_up_proj, None).chunk(2, dim=-1)  # [T, I] each
        return self.linear(F.silu(gate) * up, layer.down_proj, None)  # [T, H]


class _LayerWeights:
    __slots__ = (
        "down_proj",
        "gate_up_proj",
        "input_norm",
        "o_proj",
        "post_attention_norm",
        "qkv_bias",
        "qkv_proj",
    )

    def __init__(self, weights: Weights, prefix: str) -> None:
        self.input_norm = weights[prefix + "input_norm"]
        self.post_attention_norm = weights[prefix + "post_attention_norm"]
        self.qkv_proj = weights[prefix + "qkv_proj"]
        self.qkv_bias = weights.get(prefix + "qkv_bias")
        self.o_proj = weights[prefix + "o_proj"]
        self.gate_up_proj = weights[prefix + "gate_up_proj"]
        self.down_proj = weights[prefix + "down_proj"]

    @classmethod
    def of(cls, weights: Weights, index: int, config: ModelConfig) -> "_LayerWeights":
        prefix = f"layers.{index}."
        missing = [
            name
            for name in ("input_norm", "qkv_proj", "o_proj", "gate_up_proj", "down_proj")
            if prefix + name not in weights
        ]
        if missing:
            raise UnsupportedModelError(f"weights lack {', '.join(prefix + m for m in missing)}")
        if config.qkv_bias and prefix + "qkv_bias" not in weights:
            raise UnsupportedModelError(f"weights lack {prefix}qkv_bias")
        return cls(weights, prefix)
