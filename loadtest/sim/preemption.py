"""Preemption by swap against preemption by recompute, simulated at cluster scale with the H100
profile: the live preemption benchmark's question (loadtest/preemption.py) under FastSwitch's
churn, priorities that change while requests run.

The workload is the fairness benchmark's (sim/fairness.py: a heavy tenant at `ratio` times the
light one's rate, held-out ShareGPT questions, one max_tokens, answers ending at their
reference length, which the planner never sees), with virtual token counters preempting for
fairness, on units whose KV pool is cut to `kv_fraction` of an H100's, so that memory runs
out as well. The same requests run twice: with no host tier (every preemption recomputes),
and with one of `host_multiple` times the pool where a swap moves a token's KV at
`swap_gbps` over PCIe (the cost rule chooses per victim, as live).
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from duetserve.loadtest.metrics import Percentiles, tpot_ms, ttft_ms
from duetserve.loadtest.sim import fairness as sim_fairness
from duetserve.loadtest.sim.cost import KV_BYTES_PER_TOKEN, CostModel
from duetserve.loadtest.sim.engine import run_simulation
from duetserve.services.scheduler.planner import PlannerConfig

WAYS = ("recompute", "swap")


@dataclass(slots=True)
class WayResult:
    requests: int
    failed: int
    preemptions: int
    swaps: int
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    decision_p99_us: float
    leaked_blocks: int
    # Time between tokens, every gap of every answer (FastSwitch's TBT): p99 and p99.9.
    tbt_ms: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class SimPreemptionRun:
    machine: str
    started: str
    command: str
    units: int
    heavy_rate: float
    ratio: float
    seconds: float
    max_tokens: int
    max_running: int
    kv_blocks: int
    host_blocks: int
    swap_gbps: float
    ways: dict[str, WayResult] = field(default_factory=dict)


def _percentiles(values: list[float]) -> dict[str, float]:
    found = Percentiles.of(values)
    return {} if found is None else {"p50": found.p50, "p90": found.p90, "p99": found.p99}


def _gaps(gaps: list[np.ndarray]) -> dict[str, float]:
    if not gaps:
        return {}
    a = np.concatenate(gaps)
    return {"p99": float(np.percentile(a, 99)), "p99.9": float(np.percentile(a, 99.9))}


def run(args: argparse.Namespace, profile: CostModel, full_pool_blocks: int) -> SimPreemptionRun:
    kv_blocks = max(int(full_pool_blocks * args.kv_fraction), 64)
    host_blocks = int(kv_blocks * args.host_multiple)
    result = SimPreemptionRun(
        machine=platform.machine(),
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.sim " + " ".join(sys.argv[1:]),
        units=args.units,
        heavy_rate=args.heavy_rate,
        ratio=args.ratio,
        seconds=args.seconds,
        max_tokens=args.max_tokens,
        max_running=args.max_running,
        kv_blocks=kv_blocks,
        host_blocks=host_blocks,
        swap_gbps=args.swap_gbps,
    )
    specs = sim_fairness.workload(args.heavy_rate, args.ratio, args.seconds, args.seed)
    swap_s_per_token = KV_BYTES_PER_TOKEN / (args.swap_gbps * 1e9)
    for way in WAYS:
        sim = run_simulation(
            specs,
            profile,
            units=args.units,
            mode=args.mode,
            planner_config=PlannerConfig(max_running=args.max_running),
            num_blocks=kv_blocks,
            fairness="vtc",
            max_tokens=args.max_tokens,
            host_blocks=host_blocks if way == "swap" else 0,
            swap_s_per_token=swap_s_per_token,
        )
        ok = [r for r in sim.results if r.ok]
        result.ways[way] = WayResult(
            requests=len(sim.results),
            failed=len(sim.results) - len(ok),
            preemptions=sim.preemptions,
            swaps=sim.swaps,
            ttft_ms=_percentiles([v for r in ok if (v := ttft_ms(r)) is not None]),
            tpot_ms=_percentiles([v for r in ok if (v := tpot_ms(r)) is not None]),
            decision_p99_us=sim.decisions.p99_us,
            leaked_blocks=sim.leaked_blocks,
            tbt_ms=_gaps([np.diff(r.token_times_s) * 1000 for r in ok if len(r.token_times_s) > 1]),
        )
        way_result = result.ways[way]
        print(
            f"{way}: {sim.preemptions} preemptions ({sim.swaps} swaps), TPOT p99 "
            f"{way_result.tpot_ms.get('p99', 0):.1f} ms, TBT p99.9 "
            f"{way_result.tbt_ms.get('p99.9', 0):.1f} ms, TTFT p99 "
            f"{way_result.ttft_ms.get('p99', 0):.0f} ms ({sim.wall_s:.0f} s)",
            flush=True,
        )
    return result


def write(result: SimPreemptionRun, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(result), indent=1) + "\n")


def read(path: Path) -> SimPreemptionRun:
    data = json.loads(path.read_text())
    ways = {way: WayResult(**w) for way, w in data.pop("ways").items()}
    return SimPreemptionRun(**data, ways=ways)


def report(result: SimPreemptionRun) -> str:
    head = (
        f"Simulated {result.started} on {result.machine}: {result.units} units with the H100 "
        f"profile (an 8B Llama), each pool cut to {result.kv_blocks} blocks of 16 tokens, host "
        f"tier {result.host_blocks} blocks, swaps at {result.swap_gbps:g} GB/s one way "
        f"({KV_BYTES_PER_TOKEN // 1024} KiB of KV a token). Two tenants, {result.heavy_rate:g} "
        f"and {result.heavy_rate / result.ratio:g} req/s for {result.seconds:g} s, VTC fairness "
        f"(its preemptions are the churn), at most {result.max_running} running per unit, "
        f"max_tokens {result.max_tokens} (answers end at their reference length, unseen). "
        f"Command: `{result.command}`."
    )
    rows = [
        "| preemption | requests (failed) | preemptions (swaps) | TTFT p50 / p99 | "
        "TPOT p50 / p99 | time between tokens p99 / p99.9 | decision p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for way, w in result.ways.items():
        rows.append(
            f"| {way} | {w.requests} ({w.failed}) | {w.preemptions} ({w.swaps}) | "
            f"{w.ttft_ms.get('p50', 0):.0f} / {w.ttft_ms.get('p99', 0):.0f} ms | "
            f"{w.tpot_ms.get('p50', 0):.1f} / {w.tpot_ms.get('p99', 0):.1f} ms | "
            f"{w.tbt_ms.get('p99', 0):.1f} / {w.tbt_ms.get('p99.9', 0):.1f} ms | "
            f"{w.decision_p99_us / 1000:.2f} ms |"
        )
    return head + "\n\n" + "\n".join(rows)
