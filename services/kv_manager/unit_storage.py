"""What the unit's storage holds and how it is filled: the paged KV pool, then every weight in
the runtime layout, in the run dtype, each stored once.

Tied embeddings: when the model ties its head to its embedding table, `lm_head` is the same
tensor as `embed_tokens`; only `embed_tokens` is stored, and workers re-tie on their side.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import kv_pool_shape
from duetserve.runtime.weights import Weights, load_weights
from duetserve.services.kv_manager.layout import StorageLayout
from duetserve.services.kv_manager.views import dtype_name

KV_POOL = "kv_pool"
TIED_HEAD = "lm_head"


class PoolGeometry(NamedTuple):
    num_blocks: int
    block_size: int
    dtype: torch.dtype


def load_stored_weights(model_dir: Path, config: ModelConfig, dtype: torch.dtype) -> Weights:
    """The weights in the runtime layout and `dtype`, without the tied head's second name."""
    weights = load_weights(model_dir, config, dtype)
    if config.tie_word_embeddings:
        del weights[TIED_HEAD]
    return weights


def unit_layout(
    config: ModelConfig, weights: Mapping[str, torch.Tensor], pool: PoolGeometry
) -> StorageLayout:
    """The KV pool first, then every weight, each at the next aligned offset."""
    pool_shape = kv_pool_shape(config, pool.num_blocks, pool.block_size)
    entries = [(KV_POOL, dtype_name(pool.dtype), pool_shape)]
    entries += [(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in weights.items()]
    return StorageLayout.pack(entries)


def host_layout(config: ModelConfig, pool: PoolGeometry) -> StorageLayout:
    """The host tier: a KV pool of the unit pool's block shape, and nothing else."""
    pool_shape = kv_pool_shape(config, pool.num_blocks, pool.block_size)
    return StorageLayout.pack([(KV_POOL, dtype_name(pool.dtype), pool_shape)])


def fill_storage(tensors: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> None:
    """Copy every weight into its storage tensor once and zero the KV pool."""
    for name, weight in weights.items():
        tensors[name].copy_(weight)
    tensors[KV_POOL].zero_()
    if tensors[KV_POOL].is_cuda:
        torch.cuda.synchronize(tensors[KV_POOL].device)
