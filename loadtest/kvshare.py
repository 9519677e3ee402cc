"""KVShare's quality and prefill speed on the committed reuse workload, in one process.

    python -m duetserve.loadtest.kvshare --model models/SmolLM2-135M-Instruct \
        --json docs/bench/kvshare.json [--write docs/benchmarks.md]

Requests of docs/bench/reuse_workload.json run in order, each as a chat prompt. Every one is
first computed in full (the reference): its prefill time, its greedy answer of --answer tokens
and the next-token distribution at each answer position. Its prompt's K/V then stay in the pool
as a cached entry, found by cache_index's SpanIndex; the --keep most recent entries are kept.

Then, for a request that finds spans in earlier entries, at each recomputation fraction and
with and without the decode stage (a recheck every --interval tokens):
- prefill with reuse (runtime/kv_reuse.py): placed spans, the check layer, the selected rows;
  the block-aligned exact prefix shared in place, as the prefix cache would;
- teacher-forced: the reference answer fed in, top-1 agreement of each next token with the
  reference and KL(reference || reuse) of the distributions;
- free-running: a greedy answer of the same length, agreement position by position.
Beside them, the same prompt's prefill with exact-prefix caching only (the longest block-
aligned prefix any entry shares) and in full, timed in turn with the reuse prefills.
"""

import argparse
import json
import platform
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.reuse_workload import read as read_workload
from duetserve.loadtest.reuse_workload import render
from duetserve.runtime.batch import ForwardBatch, SequenceChunk
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.kv_reuse import ReusedSpan, prefill_with_reuse, recheck
from duetserve.runtime.loader import load_model
from duetserve.runtime.models.llama import LlamaForCausalLM
from duetserve.runtime.tokenizer import Tokenizer
from duetserve.services.cache_index.spans import SpanIndex

TENANT = "bench"
FRACTIONS = (0.0, 0.05, 0.15, 0.30)
BLOCK = 16


@dataclass(frozen=True, slots=True)
class DecodeStage:
    interval: int  # generated tokens between rechecks
    top: int  # reused tokens checked each time: those the newest token attends to most
    threshold: float  # relative deviation beyond which a checked token is recomputed
    check_layer: int


@dataclass(slots=True)
class Sample:
    """One request under one configuration."""

    request: int
    fraction: float
    decode_stage: bool
    prompt_tokens: int
    reused: int  # tokens whose K/V came from a span
    recomputed: int  # of those, recomputed in every layer at prefill
    decode_recomputed: int  # recomputed by the decode stage
    prefill_s: float
    teacher_agree: float  # share of answer positions whose top-1 equals the reference's
    kl: float  # mean KL(reference || reuse) over answer positions, nats
    greedy_agree: float  # share of positions where the greedy answers agree
    greedy_exact: bool


@dataclass(slots=True)
class Baseline:
    request: int
    prompt_tokens: int
    shared_prefix: int
    full_s: float
    prefix_s: float
    prefix_agree: float  # teacher-forced top-1 agreement of exact-prefix caching with full
    prefix_kl: float


@dataclass(slots=True)
class KVShareRun:
    command: str
    machine: str
    model: str
    dtype: str
    workload: str
    answer: int
    check_layer: int
    decode_stage: dict[str, float]
    baselines: list[Baseline] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


class Store:
    """Earlier prompts' K/V in the pool (each entry's own blocks), found through a SpanIndex;
    the oldest entry goes when more than `keep` are held."""

    def __init__(self, pool: KVPool, keep: int) -> None:
        self.pool = pool
        self.keep = keep
        self.free = list(range(pool.num_blocks - 1, -1, -1))
        self.entries: OrderedDict[str, tuple[list[int], list[int]]] = OrderedDict()
        self.index = SpanIndex()

    def take(self, count: int) -> list[int]:
        if count > len(self.free):
            raise RuntimeError("the benchmark's pool is too small: raise --blocks")
        return [self.free.pop() for _ in range(count)]

    def give(self, blocks: Sequence[int]) -> None:
        self.free.extend(blocks)

    def add(self, name: str, tokens: list[int], table: list[int]) -> None:
        self.entries[name] = (tokens, table)
        self.index.add(name, TENANT, tokens)
        while len(self.entries) > self.keep:
            old, (_, blocks) = self.entries.popitem(last=False)
            self.index.remove(old)
            self.give(blocks)

    def shared_prefix(self, tokens: list[int]) -> tuple[int, list[int]]:
        """The longest block-aligned prefix of `tokens` an entry holds (leaving one token to
        compute), and that entry's blocks for it: what the prefix cache shares in place."""
        best, blocks = 0, []
        for held, table in self.entries.values():
            same = 0
            for a, b in zip(held, tokens[:-1], strict=False):
                if a != b:
                    break
                same += 1
            aligned = same // BLOCK * BLOCK
            if aligned > best:
                best, blocks = aligned, table[: aligned // BLOCK]
        return best, blocks

    def spans(self, tokens: list[int], shared: int) -> list[ReusedSpan]:
        found = []
        for match in self.index.match(TENANT, tokens):
            start, source_start, length = match.start, match.source_start, match.length
            if start + length <= shared:
                continue
            if start < shared:  # the part the shared prefix does not cover
                cut = shared - start
                start, source_start, length = shared, source_start + cut, length - cut
            _, table = self.entries[match.entry]
            slots = [
                table[p // BLOCK] * BLOCK + p % BLOCK
                for p in range(source_start, source_start + length)
            ]
            found.append(ReusedSpan(start, slots, source_start))
        return found


def _blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


def _forward(model: LlamaForCausalLM, pool: KVPool, chunk: SequenceChunk) -> torch.Tensor:  # [R, V]
    return model.forward(ForwardBatch.build([chunk], model.config, pool), pool)


def reference(
    model: LlamaForCausalLM,
    pool: KVPool,
    tokens: list[int],
    table: list[int],
    answer: int,
    interval: int,
) -> tuple[float, list[int], torch.Tensor]:
    """The full computation: (prefill seconds, greedy answer, teacher-forced log-probabilities
    [answer, V] at its positions)."""
    start = time.perf_counter()
    first = _forward(model, pool, SequenceChunk(tokens, 0, table))[-1]
    seconds = time.perf_counter() - start
    if answer == 0:
        return seconds, [], torch.empty(0)
    saved = snapshot(pool, table)
    out = greedy(model, pool, tokens, table, first, answer)
    restore(pool, table, saved)
    rows, _ = teacher_forced(model, pool, tokens, table, first, out, interval)
    return seconds, out, rows


def snapshot(pool: KVPool, blocks: list[int]) -> torch.Tensor:
    return pool.tensor[:, :, torch.tensor(blocks)].clone()


def restore(pool: KVPool, blocks: list[int], saved: torch.Tensor) -> None:
    pool.tensor[:, :, torch.tensor(blocks)] = saved


def teacher_forced(
    model: LlamaForCausalLM,
    pool: KVPool,
    tokens: list[int],
    table: list[int],
    first: torch.Tensor,
    answer: list[int],
    interval: int,
    stage: DecodeStage | None = None,
    candidates: list[int] | None = None,
) -> tuple[torch.Tensor, int]:
    """Log-probabilities [len(answer), V] at the answer's positions, the answer fed in
    `interval` tokens at a time after a prefill whose next-token logits are `first` (the
    reference and every configuration the same way, so that only reuse tells them apart); with
    a decode stage, a recheck after each piece. Also: the positions the stage recomputed."""
    left = list(candidates or [])
    recomputed = 0
    rows = [torch.log_softmax(first.float(), -1)]
    fed = 0
    while fed < len(answer) - 1:
        piece = answer[fed : min(fed + interval, len(answer) - 1)]
        chunk = SequenceChunk(piece, len(tokens) + fed, table, all_logits=True)
        rows.extend(torch.log_softmax(_forward(model, pool, chunk).float(), -1))
        fed += len(piece)
        if stage and left:
            context = tokens + answer[:fed]
            done = recheck(
                model, pool, context, table, left, stage.top, stage.threshold, stage.check_layer
            )
            recomputed += len(done.recomputed)
            again = set(done.recomputed)
            left = [p for p in left if p not in again]
    return torch.stack(rows), recomputed


def greedy(
    model: LlamaForCausalLM,
    pool: KVPool,
    tokens: list[int],
    table: list[int],
    first: torch.Tensor,
    length: int,
    stage: DecodeStage | None = None,
    candidates: list[int] | None = None,
) -> list[int]:
    """A greedy answer one token a step, as a worker decodes; with a decode stage, a recheck
    every stage.interval tokens."""
    left = list(candidates or [])
    out = [int(first.argmax())]
    while len(out) < length:
        context = len(tokens) + len(out) - 1
        logits = _forward(model, pool, SequenceChunk([out[-1]], context, table))[-1]
        out.append(int(logits.argmax()))
        if stage and left and len(out) % stage.interval == 0 and len(out) < length:
            done = recheck(
                model,
                pool,
                tokens + out,
                table,
                left,
                stage.top,
                stage.threshold,
                stage.check_layer,
            )
            again = set(done.recomputed)
            left = [p for p in left if p not in again]
    return out


def run(args: argparse.Namespace) -> KVShareRun:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = load_model(args.model, args.dtype)
    tokenizer = Tokenizer.from_dir(args.model)
    workload = read_workload(args.workload)
    pool = KVPool.allocate(
        model.config, num_blocks=args.blocks, block_size=BLOCK, dtype=model.dtype
    )
    store = Store(pool, args.keep)
    stage = DecodeStage(args.interval, args.top, args.threshold, args.decode_check_layer)
    result = KVShareRun(
        command=" ".join(["python -m duetserve.loadtest.kvshare", *args.argv]),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
        model=args.model.name,
        dtype=args.dtype,
        workload=str(args.workload),
        answer=args.answer,
        check_layer=args.check_layer,
        decode_stage=asdict(stage),
    )
    deadline = time.monotonic() + args.max_seconds
    for i in range(min(args.requests, len(workload.requests))):
        if time.monotonic() > deadline:
            print(f"stopped at request {i}: --max-seconds reached")
            break
        messages = [{"role": "user", "content": render(workload, i)}]
        tokens = tokenizer.encode_chat(messages, add_generation_prompt=True)
        shared, shared_blocks = store.shared_prefix(tokens)
        spans = store.spans(tokens, shared)
        if i >= args.warm and spans:
            _measure(
                model, pool, store, tokens, shared, shared_blocks, spans, i, args, stage, result
            )
        table = store.take(_blocks_for(len(tokens) + args.answer))
        reference(model, pool, tokens, table, 0, args.interval)
        store.add(str(i), tokens, table)
    return result


def _measure(
    model: LlamaForCausalLM,
    pool: KVPool,
    store: Store,
    tokens: list[int],
    shared: int,
    shared_blocks: list[int],
    spans: list[ReusedSpan],
    i: int,
    args: argparse.Namespace,
    stage: DecodeStage,
    result: KVShareRun,
) -> None:
    length = len(tokens)
    own = store.take(_blocks_for(length + args.answer))
    full_s, answer, ref_rows = reference(model, pool, tokens, own, args.answer, args.interval)
    table = shared_blocks + own[len(shared_blocks) :]
    start = time.perf_counter()
    first = _forward(model, pool, SequenceChunk(tokens[shared:], shared, table))[-1]
    prefix_s = time.perf_counter() - start
    # Exact-prefix caching changes only how the arithmetic is grouped: its agreement with the
    # full computation is the floor of what this dtype's rounding allows.
    rows, _ = teacher_forced(model, pool, tokens, table, first, answer, args.interval)
    prefix_agree = (rows.argmax(-1) == ref_rows.argmax(-1)).float().mean().item()
    prefix_kl = (ref_rows.exp() * (ref_rows - rows)).sum(-1).clamp_min(0).mean().item()
    result.baselines.append(Baseline(i, length, shared, full_s, prefix_s, prefix_agree, prefix_kl))
    for fraction in args.fractions:
        for with_stage in (False, True):
            start = time.perf_counter()
            done = prefill_with_reuse(
                model,
                pool,
                tokens[shared:],
                table,
                shared,
                spans,
                fraction,
                args.check_layer,
                args.sink,
            )
            seconds = time.perf_counter() - start
            use = stage if with_stage else None
            saved = snapshot(pool, own)
            rows, again = teacher_forced(
                model, pool, tokens, table, done.logits, answer, args.interval, use, done.kept
            )
            restore(pool, own, saved)
            out = greedy(model, pool, tokens, table, done.logits, len(answer), use, done.kept)
            agree = (rows.argmax(-1) == ref_rows.argmax(-1)).float().mean().item()
            kl = (ref_rows.exp() * (ref_rows - rows)).sum(-1).clamp_min(0).mean().item()
            same = sum(a == b for a, b in zip(out, answer, strict=True)) / len(answer)
            exact = out == answer
            result.samples.append(
                Sample(
                    i,
                    fraction,
                    with_stage,
                    length,
                    len(done.reused),
                    len(done.recomputed),
                    again,
                    seconds,
                    agree,
                    kl,
                    same,
                    exact,
                )
            )
    store.give(own)
    last = [s for s in result.samples if s.request == i and s.fraction == 0.15]
    print(
        f"request {i}: {length} tokens, {shared} shared, {last[0].reused} reused; full "
        f"{full_s * 1e3:.0f} ms, prefix {prefix_s * 1e3:.0f} ms, 15% {last[0].prefill_s * 1e3:.0f}"
        f" ms, agree {last[0].teacher_agree:.3f}/{last[1].teacher_agree:.3f}",
        flush=True,
    )


def read(path: Path) -> KVShareRun:
    data = json.loads(path.read_text())
    run = KVShareRun(**{k: v for k, v in data.items() if k not in ("baselines", "samples")})
    run.baselines = [Baseline(**b) for b in data["baselines"]]
    run.samples = [Sample(**s) for s in data["samples"]]
    return run


def report(run: KVShareRun) -> str:
    full = statistics.mean(b.full_s for b in run.baselines)
    prefix = statistics.mean(b.prefix_s for b in run.baselines)
    tokens = statistics.mean(b.prompt_tokens for b in run.baselines)
    shared = statistics.mean(b.shared_prefix for b in run.baselines)
    lines = [
        f"`{run.command}`",
        "",
        f"{run.model} in {run.dtype}, {run.machine}; {len(run.baselines)} requests of "
        f"`{run.workload}` that found spans (prompts {tokens:.0f} tokens on average, "
        f"{shared:.0f} of them a block-aligned exact prefix); answers of {run.answer} tokens; "
        f"check layer {run.check_layer}; decode stage: {run.decode_stage}.",
        "",
        "| recompute | decode stage | reused | TTFT ms | vs full | vs prefix cache | "
        "teacher-forced top-1 | KL (nats) | greedy agreement | greedy exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| full prefill | - | 0% | {full * 1e3:.0f} | 1.00x | {prefix / full:.2f}x | 100% | 0 | "
        "100% | 100% |",
        f"| exact prefix only | - | 0% | {prefix * 1e3:.0f} | {full / prefix:.2f}x | 1.00x | "
        f"{statistics.mean(b.prefix_agree for b in run.baselines):.1%} | "
        f"{statistics.mean(b.prefix_kl for b in run.baselines):.4f} | - | - |",
    ]
    for fraction in sorted({s.fraction for s in run.samples}):
        for with_stage in (False, True):
            rows = [
                s for s in run.samples if s.fraction == fraction and s.decode_stage == with_stage
            ]
            if not rows:
                continue
            ttft = statistics.mean(s.prefill_s for s in rows)
            reused = statistics.mean(s.reused / s.prompt_tokens for s in rows)
            lines.append(
                f"| {fraction:.0%} | {'on' if with_stage else 'off'} | {reused:.0%} | "
                f"{ttft * 1e3:.0f} | {full / ttft:.2f}x | {prefix / ttft:.2f}x | "
                f"{statistics.mean(s.teacher_agree for s in rows):.1%} | "
                f"{statistics.mean(s.kl for s in rows):.4f} | "
                f"{statistics.mean(s.greedy_agree for s in rows):.1%} | "
                f"{statistics.mean(s.greedy_exact for s in rows):.0%} |"
            )
    return "\n".join(lines)


def plot(run: KVShareRun, path: Path) -> None:
    """TTFT against teacher-forced agreement, one point a fraction, with and without the
    decode stage; full recomputation and exact-prefix caching for reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    full = statistics.mean(b.full_s for b in run.baselines) * 1e3
    prefix = statistics.mean(b.prefix_s for b in run.baselines) * 1e3
    axes.scatter([full], [100.0], marker="s", color="black", label="full prefill")
    axes.scatter([prefix], [100.0], marker="D", color="grey", label="exact prefix only")
    for with_stage, marker in ((False, "o"), (True, "^")):
        points = []
        for fraction in sorted({s.fraction for s in run.samples}):
            rows = [
                s for s in run.samples if s.fraction == fraction and s.decode_stage == with_stage
            ]
            if rows:
                ttft = statistics.mean(s.prefill_s for s in rows) * 1e3
                agree = statistics.mean(s.teacher_agree for s in rows) * 100
                points.append((ttft, agree, fraction))
        label = "reuse, decode stage " + ("on" if with_stage else "off")
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        if not with_stage:
            for ttft, agree, fraction in points:
                axes.annotate(f"{fraction:.0%}", (ttft, agree), textcoords="offset points",
                              xytext=(4, -10), fontsize=8)  # fmt: skip
    axes.axhline(99.0, color="red", linestyle=":", linewidth=1, label="99% target")
    axes.axvline(full / 3, color="red", linestyle="--", linewidth=1, label="3x lower TTFT")
    axes.set_xlabel("TTFT (prefill) ms, mean")
    axes.set_ylabel("teacher-forced top-1 agreement %")
    axes.set_title(f"{run.model} ({run.dtype}): TTFT against agreement", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct"))
    parser.add_argument("--workload", type=Path, default=Path("docs/bench/reuse_workload.json"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warm", type=int, default=4, help="requests that only fill the cache")
    parser.add_argument("--keep", type=int, default=8, help="cached prompts held")
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--check-layer", type=int, default=1)
    parser.add_argument("--sink", type=int, default=0, help="first tokens of a span recomputed")
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--top", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--decode-check-layer", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="docs/benchmarks.md: rewrite its section")
    parser.add_argument("--report", type=Path, help="only report an earlier --json")
    parser.add_argument("--plot", type=Path, help="TTFT against agreement, as a PNG")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    if args.report:
        earlier = read(args.report)
        print(report(earlier))
        if args.plot:
            plot(earlier, args.plot)
        return
    result = run(args)
    text = report(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    if args.write:
        write_section(args.write, "kvshare", "KVShare: reuse of similar prompts", text)


if __name__ == "__main__":
    main()
