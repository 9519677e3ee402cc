"""Weights in the runtime's layout, from Hugging Face names.

The runtime layout fuses q/k/v into one projection and gate/up into another, so a layer does two
large matmuls instead of five small ones. kv_manager holds one copy of this layout in shared
memory and hands it to every worker; tests and benchmarks load it here directly.

Runtime names:
    embed_tokens [V, H], final_norm [H], lm_head [V, H] (the same tensor as embed_tokens if tied)
    layers.{i}.input_norm [H], layers.{i}.post_attention_norm [H]
    layers.{i}.qkv_proj [Q + 2 KV, H], layers.{i}.qkv_bias [Q + 2 KV] (q/k/v bias models only)
    layers.{i}.o_proj [H, Q], layers.{i}.gate_up_proj [2 I, H], layers.{i}.down_proj [H, I]
"""

from collections.abc import Mapping
from pathlib import Path

import torch

from duetserve.runtime.config import ModelConfig
from duetserve.runtime.errors import UnsupportedModelError
from duetserve.runtime.safetensors_mmap import checkpoint_files, read_safetensors

Weights = dict[str, torch.Tensor]


def read_checkpoint(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under their Hugging Face names, memory-mapped."""
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(Path(model_dir)):
        tensors.update(read_safetensors(path))
    return tensors


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype) -> Weights:
    return to_runtime_layout(read_checkpoint(model_dir), config, dtype)


def to_runtime_layout(
    hf: Mapping[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype
) -> Weights:
    get = _Getter(hf, config, dtype)
    weights: Weights = {
        "embed_tokens": get("model.embed_tokens.weight", (config.vocab_size, config.hidden_size)),
        "final_norm": get("model.norm.weight", (config.hidden_size,)),
    }
    if config.tie_word_embeddings:
        weights["lm_head"] = weights["embed_tokens"]
    else:
        weights["lm_head"] = get("lm_head.weight", (config.vocab_size, config.hidden_size))
    for i in range(config.num_layers):
        weights.update(_layer_weights(get, config, i))
    return weights


def _layer_weights(get: "_Getter", config: ModelConfig, i: int) -> Weights:
    pre = f"model.layers.{i}."
    hidden, inter = config.hidden_size, config.intermediate_size
    q_shape, kv_shape = (config.q_size, hidden), (config.kv_size, hidden)
    layer = {
        "input_norm": get(pre + "input_layernorm.weight", (hidden,)),
        "post_attention_norm": get(pre + "post_attention_layernorm.weight", (hidden,)),
        "qkv_proj": torch.cat(
            [
                get(pre + "self_attn.q_proj.weight", q_shape),
                get(pre + "self_attn.k_proj.weight", kv_shape),
                get(pre + "self_attn.v_proj.weight", kv_shape),
            ]
        ),
        "o_proj": get(pre + "self_attn.o_proj.weight", (hidden, config.q_size)),
        "gate_up_proj": torch.cat(
            [
                get(pre + "mlp.gate_proj.weight", (inter, hidden)),
                get(pre + "mlp.up_proj.weight", (inter, hidden)),
            ]
        ),
        "down_proj": get(pre + "mlp.down_proj.weight", (hidden, inter)),
    }
    if config.qkv_bias:
        layer["qkv_bias"] = torch.cat(
            [
                get(pre + "self_attn.q_proj.bias", (config.q_size,)),
                get(pre + "self_attn.k_proj.bias", (config.kv_size,)),
                get(pre + "self_attn.v_proj.bias", (config.kv_size,)),
            ]
        )
    return {f"layers.{i}.{name}": tensor for name, tensor in layer.items()}


class _Getter:
    """Looks up one HF tensor, checks its shape, and casts it to the run dtype."""

    def __init__(self, hf: Mapping[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype):
        self.hf, self.config, self.dtype = hf, config, dtype

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.hf.get(name)
        if tensor is None:
            raise UnsupportedModelError(f"checkpoint lacks tensor '{name}'")
        if tuple(tensor.shape) != shape:
            raise UnsupportedModelError(
                f"tensor '{name}' has shape {tuple(tensor.shape)}, config implies {shape}"
            )
        return tensor.to(self.dtype)
