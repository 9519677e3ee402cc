"""Refused inputs raise typed errors and leave the pool exactly as it was."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.errors import (
    BlockTableError,
    ContextLengthError,
    InvalidTokenError,
    KVPoolError,
    UnsupportedModelError,
)
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from tests.conftest import ModelDirs
from tests.model_specs import TINY


@pytest.fixture(scope="module")
def tiny_dir(model_dirs: ModelDirs) -> Path:
    return model_dirs.get(TINY)


@pytest.mark.parametrize(
    ("chunk", "error", "message"),
    [
        (SequenceChunk([1, 4096], 0, [0]), InvalidTokenError, "4096"),
        (SequenceChunk([-1], 0, [0]), InvalidTokenError, "-1"),
        (SequenceChunk([1], 2048, list(range(129))), ContextLengthError, "2049"),
        (SequenceChunk([1] * 20, 0, [0]), BlockTableError, "need 2 blocks"),
        (SequenceChunk([1] * 20, 0, [0, 8]), BlockTableError, "outside the pool"),
        (SequenceChunk([1], 0, [-3]), BlockTableError, "outside the pool"),
    ],
)
def test_bad_batches_are_refused(
    tiny_dir: Path, chunk: SequenceChunk, error: type[Exception], message: str
) -> None:
    model = load_model(tiny_dir)
    pool = KVPool.allocate(model.config, num_blocks=8, block_size=16)
    pool.tensor.normal_()
    before = pool.tensor.clone()
    with pytest.raises(error, match=message):
        model.forward(ForwardBatch.build([chunk], model.config, pool), pool)
    assert torch.equal(pool.tensor, before)


def test_pool_of_another_dtype_is_refused(tiny_dir: Path) -> None:
    model = load_model(tiny_dir, "float32")
    pool = KVPool.allocate(model.config, 4, 16, dtype=torch.bfloat16)
    before = pool.tensor.clone()
    batch = ForwardBatch.build([SequenceChunk([1, 2], 0, [0])], model.config, pool)
    with pytest.raises(KVPoolError, match="bfloat16"):
        model.forward(batch, pool)
    assert torch.equal(pool.tensor, before)


def test_unsupported_directories_name_the_problem(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"no config\.json"):
        ModelConfig.from_dir(tmp_path)
    broken = tmp_path / "gpt2"
    shutil.copytree(tiny_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="safetensors only"):
        load_model(broken)


def test_runtime_does_not_import_transformers(tiny_dir: Path) -> None:
    code = f"""
import sys
from duetserve.runtime.loader import load_model
from duetserve.runtime.offline import OfflineEngine
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.sampling import SamplingParams
model = load_model({str(tiny_dir)!r})
OfflineEngine(model, KVPool.allocate(model.config, 4, 16), frozenset()).generate(
    [[1, 2, 3]], SamplingParams(max_tokens=2))
assert "transformers" not in sys.modules, "runtime imported transformers"
"""
    subprocess.run([sys.executable, "-c", code], check=True)
