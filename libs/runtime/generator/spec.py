"""What a generated model looks like: architecture, shape and how its random weights are drawn."""

from dataclasses import dataclass, replace
from typing import Any, Literal

Architecture = Literal["llama", "mistral", "qwen2"]

_CLASS_NAMES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    architecture: Architecture
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_context_len: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    llama3_rope_scaling: bool = False
    storage_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0

    def with_(self, **changes: Any) -> "ModelSpec":
        return replace(self, **changes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self, bos_id: int, eos_ids: list[int], pad_id: int) -> dict[str, Any]:
        """config.json as transformers writes it for this architecture."""
        config: dict[str, Any] = {
            "architectures": [_CLASS_NAMES[self.architecture]],
            "model_type": self.architecture,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_context_len,
            "rms_norm_eps": 1e-5,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": bos_id,
            "eos_token_id": eos_ids[0],
            "pad_token_id": pad_id,
            "torch_dtype": self.storage_dtype,
            "initializer_range": 0.02,
            "use_cache": True,
            "rope_parameters": self._rope_parameters(),
        }
        if self.architecture == "llama":
            config |= {"attention_bias": self.qkv_bias, "mlp_bias": False}
        if self.architecture == "qwen2":
            config |= {"use_sliding_window": False, "sliding_window": None}
        if self.architecture == "mistral":
            config |= {"sliding_window": None}
        return config

    def _rope_parameters(self) -> dict[str, Any]:
        if not self.llama3_rope_scaling:
            return {"rope_type": "default", "rope_theta": self.rope_theta}
        return {
            "rope_type": "llama3",
            "rope_theta": self.rope_theta,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Shorter than the context, so the scaled frequencies actually matter.
            "original_max_position_embeddings": self.max_context_len // 4,
        }


PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        name="tiny",
        architecture="llama",
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=688,
        vocab_size=4096,
        max_context_len=2048,
    ),
    "small": ModelSpec(
        name="small",
        architecture="llama",
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        vocab_size=16384,
        max_context_len=4096,
    ),
}
