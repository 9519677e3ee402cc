"""Writes a complete Hugging Face model directory with random weights from a fixed seed.

config.json, generation_config.json, model.safetensors, tokenizer.json (a byte-level BPE
committed under generator/tokenizers/), tokenizer_config.json with the chat template, and
special_tokens_map.json: everything transformers or any serving stack needs to load it.
"""

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from duetserve.runtime.generator import assets
from duetserve.runtime.generator.spec import ModelSpec

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_model(
    spec: ModelSpec, out_dir: str | Path, progress: Progress = _stderr_progress
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = _special_token_ids(spec.vocab_size)
    eos_ids = [token_ids[assets.EOS_TOKEN], token_ids[assets.IM_END_TOKEN]]
    bos_id, pad_id = token_ids[assets.BOS_TOKEN], token_ids[assets.PAD_TOKEN]
    progress(f"{spec.name}: writing {spec.architecture} model to {out}")
    _write_json(out / "config.json", spec.hf_config(bos_id, eos_ids, pad_id))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_ids, "pad_token_id": pad_id},
    )
    _write_tokenizer_files(spec, out)
    tensors = dict(_random_weights(spec, progress))
    progress(f"{spec.name}: saving {len(tensors)} tensors to model.safetensors")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    progress(f"{spec.name}: done ({_parameter_count(tensors) / 1e6:.1f}M parameters)")
    return out


def _special_token_ids(vocab_size: int) -> dict[str, int]:
    tokenizer = HFTokenizer.from_file(str(assets.tokenizer_json_path(vocab_size)))
    ids = {}
    for token in assets.SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None, f"committed tokenizer lacks {token}"
        ids[token] = token_id
    return ids


def _write_tokenizer_files(spec: ModelSpec, out: Path) -> None:
    shutil.copyfile(assets.tokenizer_json_path(spec.vocab_size), out / "tokenizer.json")
    special = {
        "bos_token": assets.BOS_TOKEN,
        "eos_token": assets.IM_END_TOKEN,
        "pad_token": assets.PAD_TOKEN,
    }
    _write_json(out / "special_tokens_map.json", special)
    _write_json(
        out / "tokenizer_config.json",
        special
        | {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "model_max_length": spec.max_context_len,
            "chat_template": assets.CHAT_TEMPLATE,
        },
    )


def _random_weights(spec: ModelSpec, progress: Progress) -> Iterator[tuple[str, torch.Tensor]]:
    """Weights drawn so that a random model still says varied things (greedy decoding wanders
    through the vocabulary instead of repeating one token): unit-variance projections keep every
    layer's contribution of the same size as the token's own embedding."""
    generator = torch.Generator().manual_seed(spec.seed)
    dtype = getattr(torch, spec.storage_dtype)
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(dtype)

    yield "model.embed_tokens.weight", normal(spec.vocab_size, hidden, std=1.0)
    for i in range(spec.num_layers):
        progress(f"{spec.name}: layer {i + 1}/{spec.num_layers}")
        pre = f"model.layers.{i}."
        yield pre + "input_layernorm.weight", torch.ones(hidden, dtype=dtype)
        yield pre + "post_attention_layernorm.weight", torch.ones(hidden, dtype=dtype)
        for name, rows in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            yield pre + f"self_attn.{name}.weight", normal(rows, hidden, std=hidden**-0.5)
            if spec.qkv_bias:
                yield pre + f"self_attn.{name}.bias", normal(rows, std=0.1)
        yield pre + "self_attn.o_proj.weight", normal(hidden, q_size, std=q_size**-0.5)
        yield pre + "mlp.gate_proj.weight", normal(inter, hidden, std=hidden**-0.5)
        yield pre + "mlp.up_proj.weight", normal(inter, hidden, std=hidden**-0.5)
        yield pre + "mlp.down_proj.weight", normal(hidden, inter, std=inter**-0.5)
    if spec.tie_word_embeddings:
        # A tied head reads logits off the embeddings, and the residual stream still holds the
        # current token's own: a zero-mean final norm weight stops every token predicting itself.
        yield "model.norm.weight", normal(hidden, std=1.0)
    else:
        yield "model.norm.weight", torch.ones(hidden, dtype=dtype)
    if not spec.tie_word_embeddings:
        yield "lm_head.weight", normal(spec.vocab_size, hidden, std=hidden**-0.5)


def _parameter_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
