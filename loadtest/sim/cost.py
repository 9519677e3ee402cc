"""How long a unit's steps take: the simulator's only model of the hardware.

A step's time depends on what it computes and on the worker's compute share (semi-PD splits one
device between a prefill and a decode worker):
- prefill: `tokens` new prompt tokens attending to `context` keys in all (a chunk of n tokens
  starting at position s attends to n·s + n(n+1)/2 keys);
- decode: `seqs` sequences, one new token each, over `context` KV tokens in all;
- mixed (a unified worker's step): both in one forward pass.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np


class CostModel(Protocol):
    def prefill_s(self, tokens: int, context: int, share: float) -> float: ...

    def decode_s(self, seqs: int, context: int, share: float) -> float: ...

    def mixed_s(
        self, prefill_tokens: int, prefill_context: int, seqs: int, context: int, share: float
    ) -> float: ...


def attended_keys(start: int, tokens: int) -> int:
    """Keys attended by a causal chunk of `tokens` tokens starting at position `start`."""
    return tokens * start + tokens * (tokens + 1) // 2


@dataclass(frozen=True, slots=True)
class FixedCost:
    """Constant step times whatever the batch or share: a hand-checkable queue for tests."""

    prefill_step_s: float
    decode_step_s: float

    def prefill_s(self, tokens: int, context: int, share: float) -> float:
        return self.prefill_step_s

    def decode_s(self, seqs: int, context: int, share: float) -> float:
        return self.decode_step_s

    def mixed_s(
        self, prefill_tokens: int, prefill_context: int, seqs: int, context: int, share: float
    ) -> float:
        return (self.prefill_step_s if prefill_tokens else 0.0) + (
            self.decode_step_s if seqs else 0.0
        )


class StepMeasurement(NamedTuple):
    kind: Literal["prefill", "decode"]
    tokens: int  # prefill tokens, or decoding sequences
    context: int  # attended keys (prefill) or KV tokens read (decode)
    seconds: float  # at the whole machine (share 1.0)


@dataclass(frozen=True, slots=True)
class CpuProfile:
    """Linear step times fitted on our CPU: base + per_token·tokens + per_context·context.

    Assumption: a share s of the cores runs the token- and context-proportional work 1/s times
    slower (matmuls and attention split linearly over cores); the base (Python, dispatch) does
    not scale with cores."""

    prefill_base_s: float
    prefill_per_token_s: float
    prefill_per_context_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_context_s: float

    def prefill_s(self, tokens: int, context: int, share: float) -> float:
        work = self.prefill_per_token_s * tokens + self.prefill_per_context_s * context
        return self.prefill_base_s + work / share

    def decode_s(self, seqs: int, context: int, share: float) -> float:
        work = self.decode_per_seq_s * seqs + self.decode_per_context_s * context
        return self.decode_base_s + work / share

    def mixed_s(
        self, prefill_tokens: int, prefill_context: int, seqs: int, context: int, share: float
    ) -> float:
        """One forward pass: one base (the larger), the two kinds of work added."""
        prefill = self.prefill_s(prefill_tokens, prefill_context, share) - self.prefill_base_s
        decode = self.decode_s(seqs, context, share) - self.decode_base_s
        return max(self.prefill_base_s, self.decode_base_s) + prefill + decode


def _least_squares(rows: Sequence[StepMeasurement]) -> tuple[float, float, float]:
    if len(rows) < 3:
        raise ValueError(f"need at least 3 measurements of each kind, got {len(rows)}")
    features = np.array([[1.0, r.tokens, r.context] for r in rows])
    seconds = np.array([r.seconds for r in rows])
    solution, *_ = np.linalg.lstsq(features, seconds, rcond=None)
    base, per_token, per_context = (max(float(v), 0.0) for v in solution)
    return base, per_token, per_context


def fit_cpu_profile(measurements: Sequence[StepMeasurement]) -> CpuProfile:
    """Least squares of seconds on (1, tokens, context), per kind; negative terms clipped to
    zero (a step never gets faster with more work)."""
    prefill = _least_squares([m for m in measurements if m.kind == "prefill"])
    decode = _least_squares([m for m in measurements if m.kind == "decode"])
    return CpuProfile(*prefill, *decode)


def measure_cpu_profile(model_dir: Path, dtype: str = "float32") -> list[StepMeasurement]:
    """Time real prefill and decode steps of `duetserve.runtime` on this machine (a few
    minutes; not run by the tests). Feed the result to `fit_cpu_profile`."""
    from duetserve.loadtest.sim.measure import measure_steps  # torch only when measuring

    return measure_steps(model_dir, dtype)


# --- An 8B Llama on one H100, from published peak rates. Written assumptions: ---
# Model: Llama-3.1-8B: 8.03e9 parameters; 32 layers, hidden 4096, MLP 14336, 32 query heads and
# 8 KV heads of 128, vocabulary 128256; bf16. Matmul weights a token goes through: per layer
# q,o 4096² each + k,v 4096·1024 each + MLP 3·4096·14336 = 218.1M, × 32 = 6.98e9, plus the LM
# head 0.525e9 = 7.50e9 (the embedding table is a gather, not a matmul).
MATMUL_PARAMS = 7.50e9
WEIGHT_BYTES = 2 * MATMUL_PARAMS  # bf16 weights a step streams from HBM
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V × layers × KV heads × head dim × bf16
ATTENTION_FLOPS_PER_KEY = 4 * 32 * 128 * 32  # QK^T and PV: 4 × q heads × head dim × layers
# Device: H100 SXM, 80 GB HBM3. Published: 989 TFLOP/s dense bf16, 3.35 TB/s.
H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12
H100_HBM_BYTES = 80e9


@dataclass(frozen=True, slots=True)
class GpuRooflineProfile:
    """Step time = max(FLOPs / (share·peak·eff), bytes / (share·bw·eff_bw)) + overhead.

    Assumptions: large-GEMM efficiency 0.6 of peak (typical MFU of serving prefill); HBM
    streams at 0.8 of its peak; a fixed 0.5 ms per step (launch, sampling, scheduling glue,
    with CUDA graphs). A share s of the SMs gets s of the FLOPs (linear), and s of the
    bandwidth too (proportional; in practice a small SM share can draw more than its share
    of bandwidth, so this is pessimistic for a decode worker on few SMs)."""

    peak_flops: float = H100_BF16_FLOPS
    bandwidth: float = H100_HBM_BYTES_PER_S
    efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    step_overhead_s: float = 0.5e-3
    weight_bytes: float = WEIGHT_BYTES

    def _step(self, flops: float, bytes_moved: float, share: float) -> float:
        compute = flops / (share * self.peak_flops * self.efficiency)
        memory = bytes_moved / (share * self.bandwidth * self.bandwidth_efficiency)
        return max(compute, memory) + self.step_overhead_s

    def mixed_s(
        self, prefill_tokens: int, prefill_context: int, seqs: int, context: int, share: float
    ) -> float:
        tokens = prefill_tokens + seqs
        flops = 2 * MATMUL_PARAMS * tokens + ATTENTION_FLOPS_PER_KEY * (prefill_context + context)
        # weights once; KV read by decodes and written by every new token
        bytes_moved = self.weight_bytes + KV_BYTES_PER_TOKEN * (context + tokens)
        return self._step(flops, bytes_moved, share)

    def prefill_s(self, tokens: int, context: int, share: float) -> float:
        return self.mixed_s(tokens, context, 0, 0, share)

    def decode_s(self, seqs: int, context: int, share: float) -> float:
        return self.mixed_s(0, 0, seqs, context, share)

    def kv_blocks(self, block_size: int, memory_utilization: float = 0.9) -> int:
        """KV blocks that fit: 90% of HBM less the weights and 4 GB of activations
        (assumption, as vLLM's gpu_memory_utilization=0.9)."""
        free = H100_HBM_BYTES * memory_utilization - 2 * 8.03e9 - 4e9
        return int(free // (KV_BYTES_PER_TOKEN * block_size))
