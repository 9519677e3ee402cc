"""Preemption by swap against preemption by recompute, live, under the same churn: a KV pool
too small for the load (DUET_KV_CACHE_MB), so decoding requests keep running out of blocks and
are preempted; once with no host tier (recompute), once with one (DUET_HOST_KV_MB: swap).

    python -m duetserve.loadtest.preemption run --kv-cache-mb 24 --host-kv-mb 256 \\
        --rate 4 --requests 120 --out docs/bench/preemption_smollm2.json
    python -m duetserve.loadtest.preemption report docs/bench/preemption_smollm2.json \\
        --write docs/benchmarks.md

Held-out ShareGPT questions to the chat endpoint, one max_tokens, answers ending at EOS; the
same requests both times. Reported: TTFT and TPOT percentiles, and the scheduler's counts of
preemptions and swaps (from /metrics).
"""

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from duetserve.loadtest import arrivals
from duetserve.loadtest.autotune import token_counter
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.client import run_requests
from duetserve.loadtest.length_train import held_out
from duetserve.loadtest.metrics import tpot_ms, ttft_ms
from duetserve.loadtest.modes_live import add_stack_arguments, serving
from duetserve.loadtest.sharegpt import sharegpt
from duetserve.loadtest.spec import RequestSpec

WAYS = ("recompute", "swap")


@dataclass(slots=True)
class WayRun:
    requests: int
    failed: int
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    preemptions: float
    mean_output_tokens: float


@dataclass(slots=True)
class PreemptionRun:
    machine: str
    started: str
    command: str
    model: str
    kv_cache_mb: float
    host_kv_mb: float
    rate: float
    requests: int
    max_tokens: int
    ways: dict[str, WayRun] = field(default_factory=dict)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def workload(args: argparse.Namespace) -> list[RequestSpec]:
    drawn = sharegpt(None, 8 * args.requests, args.seed, token_counter(args.model))
    questions = [s for s in drawn if isinstance(s.prompt, str) and held_out(s.prompt.strip())]
    specs = [
        replace(s, index=i, output_tokens=args.max_tokens, seed=i)
        for i, s in enumerate(questions[: args.requests])
    ]
    times = arrivals.poisson(args.rate, len(specs), args.seed)
    return [replace(s, arrival_s=t) for s, t in zip(specs, times, strict=True)]


def _preemptions(base_url: str) -> float:
    """The scheduler's preemption count, as ingress's /metrics reports it."""
    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^duet_scheduler_preemptions(?:_total)? ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def run(args: argparse.Namespace) -> PreemptionRun:
    result = PreemptionRun(
        machine=f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.preemption " + " ".join(args.argv),
        model=args.model.name,
        kv_cache_mb=args.kv_cache_mb,
        host_kv_mb=args.host_kv_mb,
        rate=args.rate,
        requests=args.requests,
        max_tokens=args.max_tokens,
    )
    specs = workload(args)
    for way in args.ways:
        env = {
            "DUET_MODEL": str(args.model.resolve()),
            "DUET_KV_CACHE_MB": str(args.kv_cache_mb),
            "DUET_HOST_KV_MB": str(args.host_kv_mb if way == "swap" else 0),
        }
        with serving(env, args.var_dir / way, args.port, args.ready_timeout_s) as url:
            results = asyncio.run(
                run_requests(
                    url,
                    args.model.name,
                    specs,
                    endpoint="chat",
                    force_length=False,
                    send_duet_slo=False,
                    drain_timeout_s=args.drain_timeout_s,
                    progress=False,
                )
            )
            preemptions = _preemptions(url)
        ok = [r for r in results if r.ok]
        result.ways[way] = WayRun(
            requests=len(results),
            failed=len(results) - len(ok),
            ttft_ms=_percentiles([v for r in ok if (v := ttft_ms(r)) is not None]),
            tpot_ms=_percentiles([v for r in ok if (v := tpot_ms(r)) is not None]),
            preemptions=preemptions,
            mean_output_tokens=sum(r.output_tokens for r in ok) / max(len(ok), 1),
        )
        w = result.ways[way]
        print(
            f"{way}: TPOT p99 {w.tpot_ms.get('p99', float('nan')):.0f} ms, TTFT p99 "
            f"{w.ttft_ms.get('p99', float('nan')):.0f} ms, {w.preemptions:.0f} preemptions",
            flush=True,
        )
        args.out.write_text(json.dumps(asdict(result), indent=1) + "\n")
        time.sleep(args.pause_s)
    return result


def read(path: Path) -> PreemptionRun:
    data = json.loads(path.read_text())
    ways = {name: WayRun(**w) for name, w in data.pop("ways").items()}
    return PreemptionRun(**data, ways=ways)


def report(run: PreemptionRun) -> str:
    lines = [
        "| preemption | requests (failed) | preemptions | TTFT p50 / p99 | TPOT p50 / p99 |",
        "|---|---|---|---|---|",
    ]
    for way, w in run.ways.items():
        lines.append(
            f"| {way} | {w.requests} ({w.failed}) | {w.preemptions:.0f} | "
            f"{w.ttft_ms.get('p50', 0):.0f} / {w.ttft_ms.get('p99', 0):.0f} ms | "
            f"{w.tpot_ms.get('p50', 0):.0f} / {w.tpot_ms.get('p99', 0):.0f} ms |"
        )
    ratio = ""
    if set(WAYS) <= set(run.ways):
        slow, fast = (run.ways[w].tpot_ms.get("p99", float("nan")) for w in WAYS)
        ratio = f"\n\np99 TPOT, recompute over swap: **{slow / fast:.2f}x**."
    intro = (
        f"Measured {run.started} on {run.machine}; {run.model}, a KV pool of "
        f"{run.kv_cache_mb:g} MiB (too small for the load: decoding requests run out of "
        f"blocks and are preempted), host tier {run.host_kv_mb:g} MiB for the swap run. "
        f"{run.requests} held-out ShareGPT questions at {run.rate:g} req/s (Poisson), chat, "
        f"max_tokens {run.max_tokens}, answers ending at EOS; the same requests both ways. "
        f"Command: `{run.command}`."
    )
    return intro + "\n\n" + "\n".join(lines) + ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    add_stack_arguments(go, port=8323, var_dir="/tmp/duet-preemption", drain_timeout_s=180.0)
    go.add_argument("--ways", type=lambda s: s.split(","), default=list(WAYS))
    go.add_argument("--kv-cache-mb", type=float, default=24.0)
    go.add_argument("--host-kv-mb", type=float, default=256.0)
    go.add_argument("--rate", type=float, default=4.0)
    go.add_argument("--requests", type=int, default=120)
    go.add_argument("--max-tokens", type=int, default=256)
    show = sub.add_parser("report")
    show.add_argument("json", type=Path)
    show.add_argument("--write", type=Path, default=None)
    show.add_argument("--plot", type=Path, default=None, help="p50/p90/p99 bars, each way")
    args = parser.parse_args(argv)
    if args.command == "run":
        args.argv = sys.argv[1:] if argv is None else argv
        print(report(run(args)))
        return
    result = read(args.json)
    text = report(result)
    if args.plot is not None:
        from duetserve.loadtest.plots import way_plot_link

        text += way_plot_link(
            result.ways,
            ("ttft_ms", "tpot_ms"),
            "Preemption by recompute and by swap, SmolLM2 on 2 cores",
            args.plot,
            args.write,
        )
    if args.write is not None:
        write_section(args.write, "preemption", "Preemption: swap against recompute", text)
    print(text)


if __name__ == "__main__":
    main()
