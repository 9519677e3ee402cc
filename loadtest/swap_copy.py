"""Swap bandwidth: a request's KV copied between the unit's KV pool and the host tier, both
/dev/shm regions as kv_manager makes them, with the model's real block shape.

    python -m duetserve.loadtest.swap_copy --model models/SmolLM2-135M-Instruct \\
        --tokens 256,1024,4096 --write docs/benchmarks.md

Three ways to move the same bytes, each timed as the median of `--repeats`:
- block groups: the request's blocks contiguous in both pools (the allocator hands a grant's
  blocks out as a run), so `kv_transfer.copy_blocks` moves each layer's K and V in one copy;
- one block at a time: the same blocks scattered in both pools, one copy per block per layer;
- plain: one contiguous copy of the same number of bytes (what memcpy does on this machine).
"""

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from duetserve.loadtest.bench_report import write_section
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import KVPool, kv_bytes_per_block
from duetserve.runtime.loader import parse_dtype
from duetserve.services.kv_manager.storage import CpuSharedStorage
from duetserve.services.kv_manager.unit_storage import KV_POOL, PoolGeometry, host_layout
from duetserve.services.unit_worker.kv_transfer import copy_blocks

BLOCK_SIZE = 16


def _median_s(action: Callable[[], object], repeats: int) -> float:
    action()  # warm: page faults of a fresh mapping are not a copy's cost
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(config: ModelConfig, dtype: torch.dtype, tokens: int, repeats: int) -> dict[str, float]:
    blocks = -(-tokens // BLOCK_SIZE)
    pool_blocks = 4 * blocks
    storages = [
        CpuSharedStorage.create(
            f"duet-swapcopy-{os.getpid()}-{name}",
            host_layout(config, PoolGeometry(pool_blocks, BLOCK_SIZE, dtype)),
        )
        for name in ("unit", "host")
    ]
    try:
        device, host = (KVPool(s.tensors[KV_POOL]) for s in storages)
        device.tensor.normal_()
        host.tensor.zero_()
        run = list(range(blocks))
        scattered_src = list(range(0, 2 * blocks, 2))  # every other block: no two adjacent
        scattered_dst = list(range(pool_blocks - 1, pool_blocks - 1 - 2 * blocks, -2))
        nbytes = blocks * device.block_nbytes
        source = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        target = torch.empty(nbytes, dtype=torch.uint8)
        grouped = _median_s(lambda: copy_blocks(device, host, run, run), repeats)
        if not torch.equal(host.tensor[:, :, :blocks], device.tensor[:, :, :blocks]):
            raise AssertionError("the grouped copy did not copy the blocks bit for bit")
        one_by_one = _median_s(
            lambda: copy_blocks(device, host, scattered_src, scattered_dst), repeats
        )
        plain = _median_s(lambda: target.copy_(source), repeats)
        return {
            "tokens": tokens,
            "blocks": blocks,
            "nbytes": nbytes,
            "grouped_gbps": nbytes / grouped / 1e9,
            "one_by_one_gbps": nbytes / one_by_one / 1e9,
            "plain_gbps": nbytes / plain / 1e9,
            "grouped_ms": grouped * 1e3,
        }
    finally:
        for storage in storages:
            storage.close()


def report(rows: list[dict[str, float]], args: argparse.Namespace, dtype: str) -> str:
    lines = [
        "| request | bytes | block groups | one block at a time | plain copy | groups / plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']:.0f} tokens ({r['blocks']:.0f} blocks) "
            f"| {r['nbytes'] / 2**20:.1f} MiB "
            f"| {r['grouped_gbps']:.2f} GB/s ({r['grouped_ms']:.2f} ms) "
            f"| {r['one_by_one_gbps']:.2f} GB/s | {r['plain_gbps']:.2f} GB/s "
            f"| {r['grouped_gbps'] / r['plain_gbps']:.2f} |"
        )
    intro = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores; {args.model.name} KV "
        f"({dtype}, blocks of {BLOCK_SIZE} tokens), unit pool to host tier, both /dev/shm. "
        f"Median of {args.repeats}. Command: `python -m duetserve.loadtest.swap_copy "
        f"{' '.join(args.argv)}`."
    )
    return intro + "\n\n" + "\n".join(lines)


def plot(rows: list[dict[str, float]], path: Path) -> None:
    """GB/s of each way of copying, by request size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    ways = [("grouped_gbps", "block groups"), ("one_by_one_gbps", "one block at a time")]
    ways.append(("plain_gbps", "plain copy of the same bytes"))
    width = 0.27
    for i, (key, label) in enumerate(ways):
        xs = [x + (i - 1) * width for x in range(len(rows))]
        axes.bar(xs, [r[key] for r in rows], width=width, label=label)
    axes.set_xticks(range(len(rows)), [f"{r['tokens']:.0f} tokens" for r in rows])
    axes.set_ylabel("GB/s")
    axes.set_title("Swap copies, unit pool to host tier")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[256])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="GB/s by request, each copy")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    config = ModelConfig.from_dir(args.model)
    dtype = parse_dtype(args.dtype)
    print(f"{kv_bytes_per_block(config, BLOCK_SIZE, dtype)} bytes a block", flush=True)
    measure(config, dtype, min(args.tokens), args.repeats)  # the process's first copies are slow
    rows = [measure(config, dtype, tokens, args.repeats) for tokens in args.tokens]
    text = report(rows, args, args.dtype)
    if args.plot is not None:
        plot(rows, args.plot)
        where = args.write.parent if args.write is not None else Path.cwd()
        text += f"\n\n![swap bandwidth]({os.path.relpath(args.plot, where)})"
    if args.write is not None:
        write_section(args.write, "swap-copy", "Swap bandwidth: block groups", text)
    print(text)


if __name__ == "__main__":
    main()
