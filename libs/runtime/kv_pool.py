"""The paged KV pool as the runtime sees it: a tensor someone else allocated (kv_manager, in
shared memory or CUDA IPC memory), viewed per layer. The runtime never allocates it in serving;
`KVPool.allocate` exists for tests and benchmarks that run the runtime alone.
"""

from dataclasses import dataclass

import torch

from duetserve.runtime.config import ModelConfig
from duetserve.runtime.errors import KVPoolError

DEFAULT_BLOCK_SIZE = 16


def kv_pool_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """[layers, 2 (K then V), blocks, block_size, kv_heads, head_dim]."""
    return (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return per_token * block_size * dtype.itemsize


@dataclass(frozen=True, slots=True)
class KVPool:
    tensor: torch.Tensor  # [L, 2, N, bs, Hkv, D], contiguous

    @property
    def num_blocks(self) -> int:
        return self.tensor.shape[2]

    @property
    def block_size(self) -> int:
        return self.tensor.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across every layer, K and V (`kv_bytes_per_block`)."""
        return self.tensor.nbytes // self.num_blocks

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [N, bs, Hkv, D]."""
        return self.tensor[index, 0], self.tensor[index, 1]

    def check_compatible(self, config: ModelConfig, dtype: torch.dtype) -> None:
        expected = kv_pool_shape(config, self.num_blocks, self.block_size)
        if tuple(self.tensor.shape) != expected:
            raise KVPoolError(f"KV pool shape {tuple(self.tensor.shape)}, model needs {expected}")
        if self.tensor.dtype != dtype:
            raise KVPoolError(f"KV pool dtype {self.tensor.dtype}, model runs in {dtype}")
        if not self.tensor.is_contiguous():
            raise KVPoolError("KV pool must be contiguous")

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "KVPool":
        shape = kv_pool_shape(config, num_blocks, block_size)
        return cls(torch.zeros(shape, dtype=dtype, device=device))
