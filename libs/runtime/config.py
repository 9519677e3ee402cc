"""The model's shape, read from a Hugging Face `config.json` of the Llama family."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duetserve.runtime.errors import UnsupportedModelError

# architecture name -> model_type; all three are the same network up to q/k/v bias.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_context_len: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    qkv_bias: bool
    tie_word_embeddings: bool

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{model_dir}: no config.json")
        return cls.from_hf(json.loads(path.read_text()), source=str(path))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        architecture = _architecture(raw, source)
        num_q_heads = _int(raw, "num_attention_heads", source)
        hidden_size = _int(raw, "hidden_size", source)
        num_kv_heads = int(raw.get("num_key_value_heads") or num_q_heads)
        head_dim = int(raw.get("head_dim") or hidden_size // num_q_heads)
        if num_q_heads % num_kv_heads:
            raise UnsupportedModelError(
                f"{source}: num_attention_heads {num_q_heads} is not a multiple of "
                f"num_key_value_heads {num_kv_heads}"
            )
        _refuse_unsupported(raw, source)
        return cls(
            architecture=architecture,
            vocab_size=_int(raw, "vocab_size", source),
            hidden_size=hidden_size,
            intermediate_size=_int(raw, "intermediate_size", source),
            num_layers=_int(raw, "num_hidden_layers", source),
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_context_len=_context_len(raw, source),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_parameters(raw).get("rope_theta", raw.get("rope_theta", 1e4))),
            rope_scaling=_rope_scaling(raw, source),
            qkv_bias=bool(
                raw.get("attention_bias", SUPPORTED_ARCHITECTURES[architecture] == "qwen2")
            ),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )


def _architecture(raw: dict[str, Any], source: str) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return str(name)
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise UnsupportedModelError(
        f"{source}: architectures {names or '(missing)'} not supported; supported: {supported}"
    )


def _int(raw: dict[str, Any], key: str, source: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or value <= 0:
        raise UnsupportedModelError(f"{source}: '{key}' must be a positive integer, got {value!r}")
    return value


def _refuse_unsupported(raw: dict[str, Any], source: str) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act '{act}' not supported (only silu)")
    if raw.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias is not supported")
    if raw.get("quantization_config"):
        raise UnsupportedModelError(f"{source}: quantized checkpoints are not supported")


def _context_len(raw: dict[str, Any], source: str) -> int:
    """The longest sequence we serve. A sliding window shorter than the model's positions would
    need windowed attention, which we do not implement, so the window caps the context."""
    context = _int(raw, "max_position_embeddings", source)
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", True)
    if isinstance(window, int) and window > 0 and uses_window and window < context:
        return window
    return context


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters`; older configs write `rope_scaling`."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return dict(params)


def _rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling | None:
    params = _rope_parameters(raw)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"{source}: rope scaling '{rope_type}' not supported")
    try:
        return RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise UnsupportedModelError(f"{source}: llama3 rope scaling lacks {missing}") from None
