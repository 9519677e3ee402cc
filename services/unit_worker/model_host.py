"""A worker's model over the unit's shared storage: weights and KV pool mapped, never copied."""

import logging
from dataclasses import dataclass

import torch

from duetserve.proto import kv
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import build_model
from duetserve.runtime.models.llama import LlamaForCausalLM
from duetserve.runtime.sampling import Sampler
from duetserve.runtime.tokenizer import Tokenizer
from duetserve.services.kv_manager.describe import handle_of
from duetserve.services.kv_manager.storage import MappedStorage, attach_storage

logger = logging.getLogger(__name__)
KV_POOL = "kv_pool"


@dataclass(slots=True)
class ModelHost:
    description: kv.StorageDescription
    mapped: MappedStorage
    model: LlamaForCausalLM
    pool: KVPool
    sampler: Sampler
    eos_token_ids: frozenset[int]

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def close(self) -> None:
        self.mapped.close()


@dataclass(slots=True)
class MappedPool:
    """Another storage's KV pool mapped in this process (disagg: the decode worker reads the
    unit pool, where prefill wrote the KV it copies in). Its weights are mapped, not used."""

    mapped: MappedStorage
    pool: KVPool

    def close(self) -> None:
        self.mapped.close()


def map_pool(description: kv.StorageDescription) -> MappedPool:
    """Map the storage `description` names; keep only its KV pool."""
    mapped = attach_storage(handle_of(description))
    return MappedPool(mapped, KVPool(mapped.tensors[KV_POOL]))


def host_model(description: kv.StorageDescription, seed: int) -> ModelHost:
    """Map the storage and build the model on it: the weights are kv_manager's one copy."""
    mapped = attach_storage(handle_of(description))
    tensors = dict(mapped.tensors)
    pool = KVPool(tensors.pop(KV_POOL))
    config = ModelConfig.from_dir(description.model_dir)
    model = build_model(config, tensors)  # ties a head stored once; reads packed weights in place
    pool.check_compatible(config, model.dtype)
    eos = Tokenizer.from_dir(description.model_dir).eos_token_ids
    logger.info(
        "model %s (%s) on %s: %d KV blocks of %d, weights and pool mapped from %s",
        description.model_dir,
        description.dtype,
        next(iter(tensors.values())).device,
        pool.num_blocks,
        pool.block_size,
        description.kind.value,
    )
    torch.set_grad_enabled(False)
    return ModelHost(description, mapped, model, pool, Sampler(config.vocab_size, eos, seed), eos)
