"""Rotary position embedding (the half-split form Llama checkpoints use), with Llama 3.1's
frequency-dependent scaling. cos/sin are precomputed once for every position of the context."""

import math

import torch

from duetserve.runtime.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Long wavelengths are slowed by `factor`, short ones kept, the band between blended."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding:
    """x * cos + rotate_half(x) * sin, as one multiply, one roll and one fused multiply-add:
    rotate_half(x) = [-x2, x1] is x rolled by half a head times the sign folded into the sine
    table. The tables are gathered once per step (`tables`) and serve every layer, q and k heads
    rotated in one call."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        positions = torch.arange(config.max_context_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        self.half = config.head_dim // 2
        self.cos = torch.cat([freqs, freqs], dim=-1).cos().to(dtype=dtype, device=device)
        sin = freqs.sin()
        self.signed_sin = torch.cat([-sin, sin], dim=-1).to(dtype=dtype, device=device)  # [P, D]

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] at the step's positions [T]."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)

    def rotate(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, H, D] rotated by its token's position: a new tensor."""
        cos, signed_sin = tables
        return torch.addcmul(x * cos, x.roll(self.half, dims=-1), signed_sin)
