"""The runtime's Llama family against transformers' own models on the same directories."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.offline import OfflineEngine
from duetserve.runtime.sampling import SamplingParams
from tests.conftest import ModelDirs
from tests.model_specs import TINY, TINY_LLAMA3, TINY_MISTRAL, TINY_QWEN2

SPECS = [TINY, TINY_QWEN2, TINY_LLAMA3, TINY_MISTRAL]
PROMPT = [(7 * i + 11) % 3000 + 20 for i in range(48)]


def hf_model(model_dir: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def eos_ids(model_dir: Path) -> frozenset[int]:
    return frozenset(json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"])


@pytest.mark.parametrize("prepack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_logits_equal_transformers(model_dirs: ModelDirs, spec: object, prepack: bool) -> None:
    model_dir = model_dirs.get(spec)  # type: ignore[arg-type]
    model = load_model(model_dir, "float32", prepack=prepack)
    assert model.weights["layers.0.qkv_proj"].is_mkldnn == prepack
    pool = KVPool.allocate(model.config, num_blocks=8, block_size=16)
    chunk = SequenceChunk(PROMPT, 0, list(range(8)), all_logits=True)
    ours = model.forward(ForwardBatch.build([chunk], model.config, pool), pool)
    with torch.no_grad():
        reference = hf_model(model_dir)(torch.tensor([PROMPT])).logits[0]
    tolerance = 1e-4 * reference.abs().max().item()
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= tolerance


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_greedy_generation_equals_transformers(model_dirs: ModelDirs, spec: object) -> None:
    model_dir = model_dirs.get(spec)  # type: ignore[arg-type]
    model = load_model(model_dir, "float32")
    engine = OfflineEngine(model, KVPool.allocate(model.config, 16, 16), eos_ids(model_dir))
    params = SamplingParams(max_tokens=64, min_tokens=64, temperature=0.0)
    ours = engine.generate([PROMPT], params)[0].token_ids
    with torch.no_grad():
        generated = hf_model(model_dir).generate(
            torch.tensor([PROMPT]), max_new_tokens=64, min_new_tokens=64, do_sample=False
        )
    assert ours == generated[0, len(PROMPT) :].tolist()
    assert len(set(ours)) > 8, "a random model should not repeat one token"


def test_batched_generation_equals_each_alone(model_dirs: ModelDirs) -> None:
    model_dir = model_dirs.get(TINY_QWEN2)
    model = load_model(model_dir, "float32")
    prompts = [PROMPT[:n] for n in (5, 17, 33, 48)]
    params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
    alone = []
    for prompt in prompts:
        engine = OfflineEngine(model, KVPool.allocate(model.config, 16, 16), eos_ids(model_dir))
        alone.append(engine.generate([prompt], params)[0].token_ids)
    # A small token budget forces chunked prefill of later prompts beside running decodes.
    engine = OfflineEngine(
        model, KVPool.allocate(model.config, 32, 16), eos_ids(model_dir), max_batch_tokens=20
    )
    together = [g.token_ids for g in engine.generate(prompts, params)]
    assert together == alone
    assert engine.blocks.num_free == 32
