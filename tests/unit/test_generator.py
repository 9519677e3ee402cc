"""The model generator writes complete, reproducible Hugging Face directories."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import transformers

from duetserve.runtime.config import ModelConfig
from duetserve.runtime.generator.build import write_model
from duetserve.runtime.tokenizer import Tokenizer
from tests.model_specs import TINY

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_writes_a_complete_directory_with_progress(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "duetserve.runtime.generator", "tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "layer 4/4" in result.stderr and "done" in result.stderr
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    config = ModelConfig.from_dir(out)
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (256, 4, 4096)
    assert (config.num_q_heads, config.num_kv_heads, config.max_context_len) == (8, 4, 2048)
    tokenizer = Tokenizer.from_dir(out)
    reference = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hello, world!"}]
    assert tokenizer.encode_chat(messages) == reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.eos_token_ids == frozenset(eos) and len(eos) == 2


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    quiet = lambda _: None  # noqa: E731
    first = write_model(TINY, tmp_path / "a", progress=quiet)
    second = write_model(TINY, tmp_path / "b", progress=quiet)
    other = write_model(TINY.with_(seed=1), tmp_path / "c", progress=quiet)
    for name in EXPECTED_FILES:
        assert digest(first / name) == digest(second / name), name
    assert digest(first / "model.safetensors") != digest(other / "model.safetensors")
