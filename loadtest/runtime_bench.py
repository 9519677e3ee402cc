"""Runtime speed next to its floors, measured on this machine in the same run.

    python -m duetserve.loadtest.runtime_bench --model models/small [--write docs/benchmarks.md]

For each dtype: decode step time at batch 1, 8, 32, 64 with 512 tokens of context each, and
prefill throughput on 512-token prompts, for each weight layout asked for (`--weights`: oneDNN-
packed, the runtime's default on the CPU, and plain), the layouts timed in turn within each row so
that they see the same machine. Each is put next to two floors measured here and now:
bytes moved (weights + KV read) over measured memory read bandwidth, and FLOPs over measured
matmul throughput in that dtype. The ratio is time / max(floors): 1.0 would be perfect.

Then sampling at batch 32 (the worker's `Sampler` on the step's logits, 512 prompt and 64
output tokens a row), for greedy rows, the API's default (temperature 1), and a typical chat
setting (temperature 0.7, top_p 0.9, repetition penalty 1.1), each as a share of the batch-32
decode step of the same dtype and the first weight layout, timed in turn with it.
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from duetserve.loadtest.bench_report import write_section
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.layers.linear import pick_linear
from duetserve.runtime.layers.prepack import METADATA
from duetserve.runtime.loader import load_model
from duetserve.runtime.models.llama import LlamaForCausalLM
from duetserve.runtime.sampling import Sampler, SamplingParams, SequenceSamplingState

CONTEXT = 512
DECODE_BATCHES = (1, 8, 32, 64)
PREFILL_PROMPTS = 4
SAMPLING_BATCH = 32
SAMPLING_OUTPUT = 64
SAMPLINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 1 (the API default)": SamplingParams(),
    "temperature 0.7, top_p 0.9, repetition penalty 1.1": SamplingParams(
        temperature=0.7, top_p=0.9, repetition_penalty=1.1
    ),
}


@dataclass(frozen=True, slots=True)
class SamplingRow:
    what: str
    dtype: str
    seconds: float
    step_seconds: float  # the batch-32 decode step it is a share of, timed in turn with it

    @property
    def share(self) -> float:
        return self.seconds / self.step_seconds


@dataclass(frozen=True, slots=True)
class Row:
    what: str
    dtype: str
    weights: str  # the weight layout: packed or plain
    seconds: float
    tokens: int
    bytes_floor_s: float
    flops_floor_s: float

    @property
    def ratio(self) -> float:
        return self.seconds / max(self.bytes_floor_s, self.flops_floor_s)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn, after warm-up."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def timed_in_turn(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each fn, the fns run one after another in every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def read_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes per second that a full-machine reduction streams from memory."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    seconds = min(timed(lambda: data.sum(), repeats=5) for _ in range(2))
    return num_bytes / seconds


def matmul_throughput(dtype: torch.dtype) -> float:
    """The best FLOP rate over a few large GEMM shapes (the model's own among them), by the
    fastest GEMM this torch has: its default and the one the runtime picks."""
    best = 0.0
    runtime_linear = pick_linear(torch.device("cpu"), dtype)
    for m, k, n in ((2048, 768, 2048), (2048, 2048, 2048), (4096, 4096, 1024)):
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(n, k).to(dtype)
        for linear in (torch.nn.functional.linear, runtime_linear):
            seconds = min(timed(partial(linear, a, b, None), repeats=5) for _ in range(2))
            best = max(best, 2 * m * k * n / seconds)
    return best


def matmul_weight_bytes(model: LlamaForCausalLM) -> int:
    """Weights a step reads in full: everything but the embedding table (a gather of a few
    rows), which still counts when it doubles as the LM head."""
    seen: set[int] = set()
    total = 0
    for name, tensor in model.weights.items():
        # packed weights count as their bytes (":onednn"), not as the views over them
        if name == "embed_tokens" or tensor.is_mkldnn or name.endswith(METADATA):
            continue
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def step_flops(config: ModelConfig, new_tokens: int, attended_keys: int, params: int) -> float:
    """2 FLOPs per weight per token, plus QK^T and PV over every attended key."""
    attention = 4 * attended_keys * config.num_q_heads * config.head_dim * config.num_layers
    return 2.0 * params * new_tokens + attention


def decode_batch(model: LlamaForCausalLM, batch_size: int) -> tuple[KVPool, ForwardBatch]:
    """A decode step of `batch_size` sequences, each CONTEXT tokens in, over random K/V."""
    config = model.config
    blocks_per_seq = (CONTEXT + 1 + 15) // 16
    pool = KVPool.allocate(config, batch_size * blocks_per_seq, 16, dtype=model.dtype)
    pool.tensor.normal_(std=0.5)
    chunks = [
        SequenceChunk([100 + b], CONTEXT, list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)))
        for b in range(batch_size)
    ]
    return pool, ForwardBatch.build(chunks, config, pool)


def decode_rows(
    models: dict[str, LlamaForCausalLM],
    batch_size: int,
    bandwidth: float,
    flops_per_s: float,
    name: str,
) -> list[Row]:
    model = next(iter(models.values()))
    config = model.config
    pool, batch = decode_batch(model, batch_size)
    repeats = 7 if batch_size < 32 else 4
    seconds = timed_in_turn(
        {layout: partial(m.forward, batch, pool) for layout, m in models.items()}, repeats
    )
    weight_bytes = matmul_weight_bytes(model)
    kv_bytes = (
        batch_size * (CONTEXT + 1) * config.num_layers * 2 * config.kv_size * pool.dtype.itemsize
    )
    params = weight_bytes // model.dtype.itemsize
    flops = step_flops(config, batch_size, batch_size * (CONTEXT + 1), params)
    what = f"decode step, batch {batch_size}"
    floors = ((weight_bytes + kv_bytes) / bandwidth, flops / flops_per_s)
    return [Row(what, name, layout, t, batch_size, *floors) for layout, t in seconds.items()]


def prefill_rows(
    models: dict[str, LlamaForCausalLM], bandwidth: float, flops_per_s: float, name: str
) -> list[Row]:
    model = next(iter(models.values()))
    config = model.config
    blocks = CONTEXT // 16
    pool = KVPool.allocate(config, PREFILL_PROMPTS * blocks, 16, dtype=model.dtype)
    chunks = [
        SequenceChunk(
            [(7 * i + p) % 1000 + 10 for i in range(CONTEXT)],
            0,
            list(range(p * blocks, (p + 1) * blocks)),
        )
        for p in range(PREFILL_PROMPTS)
    ]
    batch = ForwardBatch.build(chunks, config, pool)
    seconds = timed_in_turn(
        {layout: partial(m.forward, batch, pool) for layout, m in models.items()}, 3, warmup=1
    )
    weight_bytes = matmul_weight_bytes(model)
    params = weight_bytes // model.dtype.itemsize
    tokens = PREFILL_PROMPTS * CONTEXT
    causal_keys = PREFILL_PROMPTS * CONTEXT * (CONTEXT + 1) // 2
    flops = step_flops(config, tokens, causal_keys, params)
    kv_bytes = tokens * config.num_layers * 2 * config.kv_size * pool.dtype.itemsize
    what = f"prefill {PREFILL_PROMPTS} x {CONTEXT} tokens"
    floors = ((weight_bytes + kv_bytes) / bandwidth, flops / flops_per_s)
    return [Row(what, name, layout, t, tokens, *floors) for layout, t in seconds.items()]


def sampling_rows(model: LlamaForCausalLM, name: str) -> list[SamplingRow]:
    """The sampler on a batch-32 step's logits, timed in turn with that step."""
    config = model.config
    pool, batch = decode_batch(model, SAMPLING_BATCH)
    logits = model.forward(batch, pool)
    sampler = Sampler(config.vocab_size, frozenset({0}))
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(config.vocab_size, (CONTEXT,), generator=generator).tolist()
    output = torch.randint(config.vocab_size, (SAMPLING_OUTPUT,), generator=generator).tolist()
    fns: dict[str, Callable[[], object]] = {"step": partial(model.forward, batch, pool)}
    for what, params in SAMPLINGS.items():
        rows = [SequenceSamplingState(params, prompt, output) for _ in range(SAMPLING_BATCH)]
        fns[what] = partial(sampler.sample, logits, rows)
    seconds = timed_in_turn(fns, 5)
    step = seconds.pop("step")
    return [SamplingRow(what, name, t, step) for what, t in seconds.items()]


def run(
    model_dir: Path, dtypes: list[str], layouts: list[str]
) -> tuple[list[Row], list[SamplingRow], dict[str, float]]:
    torch.manual_seed(0)
    bandwidth = read_bandwidth()
    machine = {"read GB/s": bandwidth / 1e9}
    rows = []
    samplings = []
    for name in dtypes:
        dtype = getattr(torch, name)
        flops_per_s = matmul_throughput(dtype)
        machine[f"{name} matmul GFLOP/s"] = flops_per_s / 1e9
        models = {
            layout: load_model(model_dir, name, prepack=layout == "packed") for layout in layouts
        }
        for batch_size in DECODE_BATCHES:
            new = decode_rows(models, batch_size, bandwidth, flops_per_s, name)
            rows += new
            print(*map(format_row, new), sep="\n", flush=True)
        new = prefill_rows(models, bandwidth, flops_per_s, name)
        rows += new
        print(*map(format_row, new), sep="\n", flush=True)
        sampled = sampling_rows(models[layouts[0]], name)
        samplings += sampled
        print(*map(format_sampling, sampled), sep="\n", flush=True)
    return rows, samplings, machine


def format_row(row: Row) -> str:
    rate = row.tokens / row.seconds
    return (
        f"| {row.what} | {row.dtype} | {row.weights} | {row.seconds * 1e3:.1f} ms | "
        f"{rate:,.0f} tok/s | "
        f"{row.bytes_floor_s * 1e3:.1f} ms | {row.flops_floor_s * 1e3:.1f} ms | {row.ratio:.2f}x |"
    )


def format_sampling(row: SamplingRow) -> str:
    return (
        f"| {row.what} | {row.dtype} | {row.seconds * 1e3:.2f} ms | "
        f"{row.step_seconds * 1e3:.1f} ms | {100 * row.share:.1f}% |"
    )


def report(
    rows: list[Row], samplings: list[SamplingRow], machine: dict[str, float], command: str
) -> str:
    lines = [
        f"Measured on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Machine, same run: "
        + ", ".join(f"{k} {v:,.1f}" for k, v in machine.items())
        + ".",
        "",
        f"Command: `{command}`",
        "",
        "| step | dtype | weights | time | throughput | bytes floor | FLOPs floor | time / floor |",
        "|---|---|---|---|---|---|---|---|",
        *(format_row(r) for r in rows),
    ]
    if samplings:
        lines += [
            "",
            f"Sampling at batch {SAMPLING_BATCH}, next to the batch-{SAMPLING_BATCH} decode step "
            "timed in turn with it:",
            "",
            "| sampling | dtype | time | decode step | share of the step |",
            "|---|---|---|---|---|",
            *(format_sampling(r) for r in samplings),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, type=Path, help="model directory (small)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument(
        "--weights", default="packed", help="comma-separated weight layouts: packed, plain"
    )
    parser.add_argument("--write", type=Path, help="update this markdown file's runtime section")
    args = parser.parse_args()
    layouts = args.weights.split(",")
    if not set(layouts) <= {"packed", "plain"}:
        parser.error(f"--weights: unknown layout in {args.weights!r}")
    rows, samplings, machine = run(args.model, args.dtypes.split(","), layouts)
    command = (
        f"python -m duetserve.loadtest.runtime_bench --model {args.model} --dtypes {args.dtypes}"
        f" --weights {args.weights}"
    )
    text = report(rows, samplings, machine, command)
    print(text)
    if args.write:
        write_section(args.write, "runtime", "Model runtime: step time against its floors", text)


if __name__ == "__main__":
    main()
