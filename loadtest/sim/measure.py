"""Real step times of `duetserve.runtime` on this machine, the data `fit_cpu_profile` fits.

Imports torch; the rest of the simulator does not."""

from pathlib import Path

from duetserve.loadtest.runtime_bench import timed
from duetserve.loadtest.sim.cost import StepMeasurement, attended_keys
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.models.llama import LlamaForCausalLM

BLOCK = 16
PREFILL_SHAPES = ((1, 64), (1, 256), (1, 1024), (4, 256), (8, 128), (2, 512))  # (seqs, tokens)
DECODE_SHAPES = ((1, 128), (1, 1024), (8, 256), (16, 512), (32, 256), (32, 1024))  # (seqs, ctx)


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


def _prefill(model: LlamaForCausalLM, seqs: int, tokens: int) -> StepMeasurement:
    per_seq = _blocks(tokens)
    pool = KVPool.allocate(model.config, seqs * per_seq, BLOCK, dtype=model.dtype)
    chunks = [
        SequenceChunk(
            [(7 * i + s) % 1000 + 10 for i in range(tokens)],
            0,
            list(range(s * per_seq, (s + 1) * per_seq)),
        )
        for s in range(seqs)
    ]
    batch = ForwardBatch.build(chunks, model.config, pool)
    seconds = timed(lambda: model.forward(batch, pool), repeats=3, warmup=1)
    return StepMeasurement("prefill", seqs * tokens, seqs * attended_keys(0, tokens), seconds)


def _decode(model: LlamaForCausalLM, seqs: int, context: int) -> StepMeasurement:
    per_seq = _blocks(context + 1)
    pool = KVPool.allocate(model.config, seqs * per_seq, BLOCK, dtype=model.dtype)
    pool.tensor.normal_(std=0.5)
    chunks = [
        SequenceChunk([100 + s], context, list(range(s * per_seq, (s + 1) * per_seq)))
        for s in range(seqs)
    ]
    batch = ForwardBatch.build(chunks, model.config, pool)
    seconds = timed(lambda: model.forward(batch, pool), repeats=5)
    return StepMeasurement("decode", seqs, seqs * (context + 1), seconds)


def measure_steps(model_dir: Path, dtype: str = "float32") -> list[StepMeasurement]:
    """Prefill and decode steps over a spread of shapes, at the whole machine (share 1.0)."""
    model = load_model(model_dir, dtype)
    rows = [_prefill(model, seqs, tokens) for seqs, tokens in PREFILL_SHAPES]
    rows += [_decode(model, seqs, context) for seqs, context in DECODE_SHAPES]
    return rows
