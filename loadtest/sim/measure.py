"""Real step times of `duetserve.runtime` on this machine, the data `fit_cpu_profile` fits.

A step is what a worker runs per iteration: the forward pass and the sampling of one token per
finished sequence (the live workers' `run_prefill` / `decode_step` do the same two things).
Measured with `threads` intra-op threads, i.e. at the share `threads / cores` of the machine, as
a worker of the live launcher runs (it gives each worker half of the cores).

Imports torch; the rest of the simulator does not."""

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from duetserve.loadtest.runtime_bench import timed
from duetserve.loadtest.sim.cost import StepMeasurement, attended_keys
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.models.llama import LlamaForCausalLM
from duetserve.runtime.sampling import Sampler
from duetserve.runtime.sampling_params import SamplingParams, SequenceSamplingState

BLOCK = 16
# (seqs, tokens): single prompts over the ShareGPT-like range, and batches of them
PREFILL_SHAPES = (
    (1, 32), (1, 64), (1, 128), (1, 256), (1, 512), (1, 1024),
    (2, 256), (4, 256), (8, 128), (2, 512),
)  # fmt: skip
# (seqs, context per sequence)
DECODE_SHAPES = (
    (1, 128), (1, 1024), (2, 256), (4, 256), (8, 256), (8, 1024),
    (16, 512), (32, 256), (32, 1024),
)  # fmt: skip


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


def _states(prompts: list[list[int]], outputs: int) -> list[SequenceSamplingState]:
    """Rows sampled as the load tests ask: temperature 1, EOS ignored."""
    params = SamplingParams(max_tokens=4096, ignore_eos=True)
    return [SequenceSamplingState(params, prompt, [5] * outputs) for prompt in prompts]


def _prefill(
    model: LlamaForCausalLM, sampler: Sampler, seqs: int, tokens: int, share: float
) -> StepMeasurement:
    per_seq = _blocks(tokens)
    pool = KVPool.allocate(model.config, seqs * per_seq, BLOCK, dtype=model.dtype)
    prompts = [[(7 * i + s) % 1000 + 10 for i in range(tokens)] for s in range(seqs)]
    chunks = [
        SequenceChunk(prompt, 0, list(range(s * per_seq, (s + 1) * per_seq)))
        for s, prompt in enumerate(prompts)
    ]
    states = _states(prompts, 0)

    def step() -> None:
        batch = ForwardBatch.build(chunks, model.config, pool)
        sampler.sample(model.forward(batch, pool), states)

    seconds = timed(step, repeats=3, warmup=1)
    keys = seqs * attended_keys(0, tokens)
    return StepMeasurement("prefill", seqs * tokens, keys, seconds, share)


def _decode(
    model: LlamaForCausalLM, sampler: Sampler, seqs: int, context: int, share: float
) -> StepMeasurement:
    per_seq = _blocks(context + 1)
    pool = KVPool.allocate(model.config, seqs * per_seq, BLOCK, dtype=model.dtype)
    pool.tensor.normal_(std=0.5)
    chunks = [
        SequenceChunk([100 + s], context, list(range(s * per_seq, (s + 1) * per_seq)))
        for s in range(seqs)
    ]
    states = _states([[7] * context for _ in range(seqs)], 1)

    def step() -> None:
        batch = ForwardBatch.build(chunks, model.config, pool)
        sampler.sample(model.forward(batch, pool), states)

    seconds = timed(step, repeats=5)
    return StepMeasurement("decode", seqs, seqs * (context + 1), seconds, share)


def measure_steps(
    model_dir: Path, dtype: str = "float32", threads: int | None = None, contended: bool = False
) -> list[StepMeasurement]:
    """Prefill and decode steps over a spread of shapes, with `threads` intra-op threads (all
    cores when None); each row carries the share of the machine it ran at.

    `contended` also times them while a second process with as many threads runs the other
    kind of step in a loop (decode steps of 8 sequences against the prefills, 256-token
    prefills against the decodes): a semi-PD unit's steady state, both workers busy."""
    cores = os.cpu_count() or 1
    threads = threads or cores
    torch.set_num_threads(threads)
    share = min(threads / cores, 1.0)
    model = load_model(model_dir, dtype)
    sampler = Sampler(model.config.vocab_size, frozenset({1}), seed=0)

    def prefills(contended: bool) -> list[StepMeasurement]:
        rows = [_prefill(model, sampler, seqs, tokens, share) for seqs, tokens in PREFILL_SHAPES]
        return [row._replace(contended=contended) for row in rows]

    def decodes(contended: bool) -> list[StepMeasurement]:
        rows = [_decode(model, sampler, seqs, ctx, share) for seqs, ctx in DECODE_SHAPES]
        return [row._replace(contended=contended) for row in rows]

    rows = prefills(False) + decodes(False)
    if contended:
        with _busy(model_dir, dtype, threads, "decode"):
            rows += prefills(True)
        with _busy(model_dir, dtype, threads, "prefill"):
            rows += decodes(True)
    return rows


@contextlib.contextmanager
def _busy(model_dir: Path, dtype: str, threads: int, kind: str) -> Iterator[None]:
    """Another process running `kind` steps back to back while the block runs."""
    command = [sys.executable, "-m", "duetserve.loadtest.sim.measure", str(model_dir), dtype]
    command += [str(threads), kind]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        process.stdout.readline()  # "ready": loaded and stepping
        yield
    finally:
        process.terminate()
        process.wait()


def busy_loop(model_dir: Path, dtype: str, threads: int, kind: str) -> None:
    torch.set_num_threads(threads)
    model = load_model(model_dir, dtype)
    sampler = Sampler(model.config.vocab_size, frozenset({1}), seed=0)
    step = _prefill if kind == "prefill" else _decode
    shape = (1, 256) if kind == "prefill" else (8, 256)
    step(model, sampler, *shape, 1.0)
    print("ready", flush=True)
    while True:
        step(model, sampler, *shape, 1.0)


if __name__ == "__main__":
    busy_loop(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4])
