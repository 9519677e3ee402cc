"""How long a unit's steps take: the simulator's only model of the hardware.

A step's time depends on what it computes and on the worker's compute share (semi-PD splits one
device between a prefill and a decode worker):
- prefill: `tokens` new prompt tokens attending to `context` keys in all (a chunk of n tokens
  starting at position s attends to n·s + n(n+1)/2 keys);
- decode: `seqs` sequences, one new token each, over `context` KV tokens in all;
- mixed (a unified worker's step): both in one forward pass.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np

StepKind = Literal["prefill", "decode"]


class CostModel(Protocol):
    def prefill_s(self, tokens: int, context: int, share: float) -> float: ...

    def decode_s(self, seqs: int, context: int, share: float) -> float: ...

    def mixed_s(
        self, prefill_tokens: int, prefill_context: int, seqs: int, context: int, share: float
    ) -> float: ...

    def contention(self, kind: "StepKind") -> float:
        """How many times slower a step of this kind runs while the unit's other worker is
        busy too (semi-PD: shared caches, memory bandwidth and the host's other processes)."""
        ...


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

    def contention(self, kind: StepKind) -> float:
        return 1.0


class StepMeasurement(NamedTuple):
    kind: StepKind
    tokens: int  # prefill tokens, or decoding sequences
    context: int  # attended keys (prefill) or KV tokens read (decode)
    seconds: float
    share: float = 1.0  # of the machine the step ran on (threads / cores)
    contended: bool = False  # timed while another process ran the other kind of step


@dataclass(frozen=True, slots=True)
class CpuProfile:
    """Linear step times fitted on our CPU: base + per_token·tokens + per_context·context.

    Assumption: a share s of the cores runs the token- and context-proportional work 1/s times
    slower (matmuls and attention split linearly over cores); the base (Python, dispatch) does
    not scale with cores. While the other worker is busy, a step takes `*_contention` times
    as long (measured, not assumed: see `fit_cpu_profile`).

    Calibrated to a live stack (`calibrate`): its workers' forward passes run `*_host_factor`
    times as long as the same steps timed alone (the unit's other processes share the cores),
    and a request reaches the scheduler `dispatch_s` after it is sent (HTTP, tokenizing, NATS
    hops; the first token's way back is in it too)."""

    prefill_base_s: float
    prefill_per_token_s: float
    prefill_per_context_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_context_s: float
    prefill_contention: float = 1.0
    decode_contention: float = 1.0
    prefill_host_factor: float = 1.0
    decode_host_factor: float = 1.0
    dispatch_s: float = 0.0

    def contention(self, kind: StepKind) -> float:
        return self.prefill_contention if kind == "prefill" else self.decode_contention

    def _host(self, kind: StepKind) -> float:
        return self.prefill_host_factor if kind == "prefill" else self.decode_host_factor

    def prefill_s(self, tokens: int, context: int, share: float) -> float:
        work = self.prefill_per_token_s * tokens + self.prefill_per_context_s * context
        return (self.prefill_base_s + work / share) * self.prefill_host_factor

    def decode_s(self, seqs: int, context: int, share: float) -> float:
        work = self.decode_per_seq_s * seqs + self.decode_per_context_s * context
        return (self.decode_base_s + work / share) * self.decode_host_factor

    def mixed_s(
        self, prefill_tokens: int, prefill_context: int, seqs: int, context: int, share: float
    ) -> float:
        """One forward pass: one base (the larger), the two kinds of work added."""
        prefill = self.prefill_s(prefill_tokens, prefill_context, share) / self.prefill_host_factor
        decode = self.decode_s(seqs, context, share) / self.decode_host_factor
        base = max(self.prefill_base_s, self.decode_base_s)
        work = prefill - self.prefill_base_s + decode - self.decode_base_s
        return (base + work) * max(self.prefill_host_factor, self.decode_host_factor)


def _least_squares(rows: Sequence[StepMeasurement]) -> tuple[float, float, float]:
    if len(rows) < 3:
        raise ValueError(f"need at least 3 measurements of each kind, got {len(rows)}")
    features = np.array([[1.0, r.tokens / r.share, r.context / r.share] for r in rows])
    seconds = np.array([r.seconds for r in rows])
    solution, *_ = np.linalg.lstsq(features, seconds, rcond=None)
    base, per_token, per_context = (max(float(v), 0.0) for v in solution)
    return base, per_token, per_context


def fit_cpu_profile(measurements: Sequence[StepMeasurement]) -> CpuProfile:
    """Least squares of seconds on (1, tokens/share, context/share), per kind, over the rows
    timed alone (the profile's own form, so rows measured on part of the machine fit its
    share-1.0 coefficients); negative terms clipped to zero (a step never gets faster with more
    work). Each kind's contention is the median of its contended rows' time over the fitted
    time alone (1.0 without contended rows)."""
    alone = [m for m in measurements if not m.contended]
    prefill = _least_squares([m for m in alone if m.kind == "prefill"])
    decode = _least_squares([m for m in alone if m.kind == "decode"])
    profile = CpuProfile(*prefill, *decode)
    slowdowns: dict[StepKind, list[float]] = {"prefill": [], "decode": []}
    for m in measurements:
        if m.contended:
            step = profile.prefill_s if m.kind == "prefill" else profile.decode_s
            slowdowns[m.kind].append(m.seconds / step(m.tokens, m.context, m.share))
    return replace(
        profile,
        prefill_contention=_median_or_one(slowdowns["prefill"]),
        decode_contention=_median_or_one(slowdowns["decode"]),
    )


def _median_or_one(values: list[float]) -> float:
    return float(np.median(values)) if values else 1.0


def measure_cpu_profile(
    model_dir: Path, dtype: str = "float32", threads: int | None = None, contended: bool = True
) -> list[StepMeasurement]:
    """Time real prefill and decode steps of `duetserve.runtime` on this machine with
    `threads` intra-op threads, alone and (`contended`) beside the other kind of step (a few
    minutes; not run by the tests). Feed the result to `fit_cpu_profile`."""
    from duetserve.loadtest.sim.measure import measure_steps  # torch only when measuring

    return measure_steps(model_dir, dtype, threads, contended)


def host_factors(profile: CpuProfile, live: Sequence[StepMeasurement]) -> CpuProfile:
    """The profile with each kind's host factor: the median of live step times over the
    profile's own prediction for the same steps."""
    ratios: dict[StepKind, list[float]] = {"prefill": [], "decode": []}
    for m in live:
        step = profile.prefill_s if m.kind == "prefill" else profile.decode_s
        ratios[m.kind].append(m.seconds / step(m.tokens, m.context, m.share))
    return replace(
        profile,
        prefill_host_factor=_median_or_one(ratios["prefill"]) * profile.prefill_host_factor,
        decode_host_factor=_median_or_one(ratios["decode"]) * profile.decode_host_factor,
    )


def read_step_logs(directory: Path) -> list[StepMeasurement]:
    """The steps live workers recorded (`DUET_STEP_LOG_DIR`), each timed by its whole
    iteration (`cycle_s`: the forward pass plus the worker's messaging around it), at the share
    of the machine its threads had."""
    rows = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            step = json.loads(line)
            share = min(step["threads"] / step["cores"], 1.0)
            rows.append(
                StepMeasurement(
                    step["kind"], step["tokens"], step["context"], step["cycle_s"], share
                )
            )
    return rows


PROFILE_FORMAT = "duet-cpu-profile"


def write_cpu_profile(
    path: Path,
    profile: CpuProfile,
    rows: Sequence[StepMeasurement],
    metadata: Mapping[str, object],
) -> None:
    """The fitted coefficients with the measurements they came from, as JSON."""
    document = {
        "format": PROFILE_FORMAT,
        "version": 1,
        "metadata": dict(metadata),
        "profile": asdict(profile),
        "measurements": [row._asdict() for row in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def read_cpu_profile(path: Path) -> CpuProfile:
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or document.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path}: not a {PROFILE_FORMAT} file")
    return CpuProfile(**document["profile"])


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
    with CUDA graphs). A share s of the SMs gets s of the FLOPs (linear) and
    min(1, s / bandwidth_saturation_share) of the HBM bandwidth. With the default 1.0 the
    bandwidth is proportional to the share, which is pessimistic for a decode worker on few
    SMs: memory-bound kernels reach most of HBM's bandwidth with a fraction of the SMs (the
    premise of semi-PD's split); 0.4, for instance, says 40% of the SMs saturate it. When both
    workers run, their bandwidths are not made to add up to the device's (prefill is
    compute-bound and draws little of it)."""

    peak_flops: float = H100_BF16_FLOPS
    bandwidth: float = H100_HBM_BYTES_PER_S
    efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    step_overhead_s: float = 0.5e-3
    weight_bytes: float = WEIGHT_BYTES
    bandwidth_saturation_share: float = 1.0

    def _step(self, flops: float, bytes_moved: float, share: float) -> float:
        compute = flops / (share * self.peak_flops * self.efficiency)
        bandwidth_share = min(1.0, share / self.bandwidth_saturation_share)
        memory = bytes_moved / (bandwidth_share * self.bandwidth * self.bandwidth_efficiency)
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

    def contention(self, kind: StepKind) -> float:
        """None beyond the share split (assumption: the two workers' SM partitions do not slow
        each other; bandwidth is already split with the share)."""
        return 1.0

    def decode_s(self, seqs: int, context: int, share: float) -> float:
        return self.mixed_s(0, 0, seqs, context, share)

    def kv_blocks(self, block_size: int, memory_utilization: float = 0.9) -> int:
        """KV blocks that fit: 90% of HBM less the weights and 4 GB of activations
        (assumption, as vLLM's gpu_memory_utilization=0.9)."""
        free = H100_HBM_BYTES * memory_utilization - 2 * 8.03e9 - 4e9
        return int(free // (KV_BYTES_PER_TOKEN * block_size))
