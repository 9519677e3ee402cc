"""From a checkpoint directory (or already-loaded weights) to a runnable model."""

from pathlib import Path

import torch

from duetserve.runtime.config import ModelConfig
from duetserve.runtime.errors import UnsupportedModelError
from duetserve.runtime.layers.attention import BACKENDS, AttentionBackend, default_backend
from duetserve.runtime.layers.prepack import (
    is_packed,
    pack_linear_weights,
    prepack_support,
    unpack_linear_weights,
)
from duetserve.runtime.models.llama import LlamaForCausalLM
from duetserve.runtime.weights import Weights, load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"dtype '{name}' not supported; choose one of {', '.join(DTYPES)}"
        ) from None


def attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks Triton on a GPU and the fast CPU path otherwise."""
    if name == "auto":
        return default_backend(device)
    if name not in BACKENDS:
        raise UnsupportedModelError(f"attention backend '{name}' unknown; one of {list(BACKENDS)}")
    return BACKENDS[name]()


def build_model(config: ModelConfig, weights: Weights, attention: str = "auto") -> LlamaForCausalLM:
    """A model over weights someone else holds (kv_manager's shared copy, say): packed linear
    weights are read in place, and a tied head stored once is tied again here."""
    device = weights["embed_tokens"].device
    if is_packed(weights):
        weights = unpack_linear_weights(weights, config)
    if config.tie_word_embeddings and "lm_head" not in weights:
        weights = {**weights, "lm_head": weights["embed_tokens"]}
    return LlamaForCausalLM(config, weights, attention_backend(attention, device))


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attention: str = "auto",
    prepack: bool = True,
) -> LlamaForCausalLM:
    """Load a checkpoint directory: config, memory-mapped safetensors, cast to `dtype`; on the
    CPU the linear weights are packed for oneDNN where this torch can (prepack=False: plain)."""
    run_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config, run_dtype)
    target = torch.device(device)
    if prepack and target.type == "cpu" and prepack_support(run_dtype).available:
        weights = pack_linear_weights(weights, config)
    if target.type != "cpu":
        moved: dict[int, torch.Tensor] = {}  # keeps tied tensors tied
        weights = {
            name: moved.setdefault(id(tensor), tensor.to(target))
            for name, tensor in weights.items()
        }
    return build_model(config, weights, attention)
