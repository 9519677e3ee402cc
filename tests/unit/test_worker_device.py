"""Every tensor a worker builds for a forward pass lives where the pool does: on a GPU, token
ids on the CPU would meet CUDA weights. Checked on the `meta` device, which no CPU-side default
can land on by accident."""

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from duetserve.proto.scheduling import Sampling
from duetserve.proto.workers import PrefillBatch, PrefillItem, SamplingState
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.sampling import Sampler
from duetserve.services.unit_worker.prefill_step import mixed_step
from duetserve.services.unit_worker.residents import Resident, decode_step
from duetserve.services.unit_worker.sequences import runtime_state, sampling_params
from tests.conftest import ModelDirs
from tests.model_specs import TINY


@pytest.fixture(scope="module")
def config(model_dirs: ModelDirs) -> ModelConfig:
    tiny: Path = model_dirs.get(TINY)
    return ModelConfig.from_dir(tiny)


def tensors_of(batch: ForwardBatch) -> dict[str, torch.Tensor]:
    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return {name: v for name, v in values.items() if isinstance(v, torch.Tensor)}


def test_a_forward_batch_is_built_on_the_pools_device(config: ModelConfig) -> None:
    pool = KVPool.allocate(config, 8, 16, device="meta")
    chunks = [SequenceChunk([5, 6, 7], 0, [1]), SequenceChunk([9], 20, [2, 3])]
    built = tensors_of(ForwardBatch.build(chunks, config, pool))
    assert len(built) == 7
    assert {name: t.device.type for name, t in built.items()} == dict.fromkeys(built, "meta")


class RecordingModel:
    """Stands in for the model: keeps each batch it is given, answers CPU logits (the sampler
    is not what this test is about)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.batches: list[ForwardBatch] = []

    def forward(self, batch: ForwardBatch, pool: KVPool) -> torch.Tensor:
        self.batches.append(batch)
        return torch.zeros(len(batch.query_lens), self.config.vocab_size)


def test_the_workers_prefill_and_decode_batches_go_to_the_pools_device(
    config: ModelConfig,
) -> None:
    model = RecordingModel(config)
    pool = KVPool.allocate(config, 8, 16, device="meta")
    host = SimpleNamespace(
        config=config,
        pool=pool,
        model=model,
        sampler=Sampler(config.vocab_size, frozenset(), seed=1),
        eos_token_ids=frozenset(),
    )
    sampling = Sampling(max_tokens=8, temperature=0.0)
    state = SamplingState((5, 6, 7), (8,), sampling, "ingress-1")
    params = sampling_params(sampling, config.vocab_size)
    resident = Resident("r-1", "w/r-1", [1], runtime_state(state, params), sampling, "ingress-1")
    item = PrefillItem("r-2", (4, 5, 6), 0, (2,), SamplingState((4, 5, 6), (), sampling, "i"))

    decode_step(host, [resident])  # type: ignore[arg-type]
    mixed_step(host, PrefillBatch(1, (item,)), [resident])  # type: ignore[arg-type]
    assert len(model.batches) == 2
    for batch in model.batches:
        assert {t.device.type for t in tensors_of(batch).values()} == {"meta"}
