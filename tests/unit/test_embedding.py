"""Sentence embeddings (runtime/embedding.py) against transformers' BertModel with the
sentence-transformers recipe (mean pooling over the mask, then unit length), and the semantic
cache's categories and their load-adapted settings on hand-built vectors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertModel

from duetserve.runtime.embedding import SentenceEncoder, bundled_model_dir
from duetserve.services.cache_index.semantic_categories import Categories, CategoryPolicy

TEXTS = [
    "How do I reverse a list in Python?",
    "capital of france",
    "a much longer question about compound interest over ten years at five percent, monthly",
    "x",
]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def test_embeddings_match_transformers_in_a_padded_batch(encoder: SentenceEncoder) -> None:
    ours = encoder.encode(TEXTS)
    model = BertModel.from_pretrained(str(bundled_model_dir())).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(ours, reference, atol=1e-5)
    # One at a time equals the batch: padding changes nothing.
    assert torch.allclose(encoder.encode(TEXTS[2:3])[0], ours[2], atol=1e-5)


def test_bfloat16_stays_within_a_few_thousandths_of_float32(encoder: SentenceEncoder) -> None:
    half = SentenceEncoder(dtype=torch.bfloat16)
    cos = (half.encode(TEXTS) * encoder.encode(TEXTS)).sum(-1)
    assert float(cos.min()) > 0.99


def test_paraphrases_embed_closer_than_unrelated_queries(encoder: SentenceEncoder) -> None:
    a, b, c = encoder.encode(["reverse a python list", "how to invert a list in python", "weather"])
    assert float(a @ b) > float(a @ c) + 0.3


class Fixed:
    """An encoder of hand-built vectors: each example text names its axis."""

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 3), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i, int(text[-1])] = 1.0
        return out


def test_a_query_goes_to_the_nearest_centroid(tmp_path: Path) -> None:
    path = tmp_path / "cats.json"
    path.write_text(
        '{"categories": {"a": {"examples": ["x0", "y0"]}, "b": {"examples": ["x1", "y2"]}}}'
    )
    cats = Categories.load(Fixed(), path)
    assert cats.assign(np.array([1.0, 0.0, 0.0], dtype=np.float32)) == "a"
    assert cats.assign(np.array([0.0, 0.6, 0.8], dtype=np.float32)) == "b"
    with pytest.raises(KeyError):
        cats.policy("a")  # no settings in that file


def test_load_loosens_thresholds_and_lengthens_ttls_within_bounds() -> None:
    p = CategoryPolicy("code", 0.9, 0.8, ttl_s=60, ttl_max_s=600, quota=10)
    assert p.threshold(0.0) == pytest.approx(0.9) and p.ttl(0.0) == 60
    assert p.threshold(0.5) == pytest.approx(0.85) and p.ttl(0.5) == pytest.approx(330)
    # Past saturation (or below idle) nothing moves beyond the measured bounds.
    assert p.threshold(7.0) == pytest.approx(0.8) and p.ttl(7.0) == 600
    assert p.threshold(-1.0) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        CategoryPolicy("bad", 0.8, 0.9, ttl_s=60, ttl_max_s=600, quota=10)
    with pytest.raises(ValueError):
        CategoryPolicy("bad", 0.9, 0.8, ttl_s=60, ttl_max_s=30, quota=10)


def test_the_shipped_categories_have_settings_for_every_category() -> None:
    cats = Categories.load(SentenceEncoder(dtype=torch.bfloat16))
    assert set(cats.names) == {"code", "chat", "factual", "finance", "volatile"}
    for name in cats.names:
        policy = cats.policy(name)
        assert policy.threshold_loose <= policy.threshold_strict
    assert cats.policy("volatile").ttl_max_s < cats.policy("factual").ttl_s
