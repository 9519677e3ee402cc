"""KVShare served: throughput and TTFT of the reuse workload with exact-prefix caching only and
with reuse of similar prompts' spans (DUET_SPAN_REUSE), the same requests, one stack each.

    python -m duetserve.loadtest.kvshare_serving --requests 120 --rate 4 \\
        --out docs/bench/kvshare_serving.json [--write docs/benchmarks.md]

The requests of docs/bench/reuse_workload.json (documents recurring in other orders, some
edited, under a question) go as chat completions, Poisson at --rate (past what the unit
serves: throughput is what it completes), each answering --max-tokens tokens (forced: both
ways do the same decode work). Throughput is completed requests over the time from the first
send to the last answer; the scheduler's reuse counters come from /metrics.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from duetserve.loadtest import arrivals
from duetserve.loadtest.autotune import token_counter
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.client import run_requests
from duetserve.loadtest.metrics import ttft_ms
from duetserve.loadtest.modes_live import add_stack_arguments, serving
from duetserve.loadtest.reuse_workload import read as read_workload
from duetserve.loadtest.reuse_workload import render
from duetserve.loadtest.spec import RequestSpec

WAYS = {"exact prefix": "0", "span reuse": "1"}  # DUET_SPAN_REUSE
_METRICS = {
    "prompt_tokens": r'^duet_ingress_tokens_total\{kind="prompt"\} ([0-9.e+]+)$',
    "cached_tokens": r'^duet_ingress_tokens_total\{kind="cached"\} ([0-9.e+]+)$',
    "reuse_prompt": r'^duet_kv_reuse_tokens\{kind="prompt"\} ([0-9.e+]+)$',
    "reused": r'^duet_kv_reuse_tokens\{kind="reused"\} ([0-9.e+]+)$',
    "recomputed": r'^duet_kv_reuse_tokens\{kind="recomputed"\} ([0-9.e+]+)$',
}


@dataclass(slots=True)
class WayRun:
    requests: int
    failed: int
    seconds: float  # first send to last answer
    throughput: float  # completed requests per second
    ttft_ms: dict[str, float]
    metrics: dict[str, float]


@dataclass(slots=True)
class ServingRun:
    machine: str
    started: str
    command: str
    model: str
    kv_cache_mb: float
    requests: int
    rate: float
    max_tokens: int
    recompute: float
    ways: dict[str, WayRun] = field(default_factory=dict)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def specs(args: argparse.Namespace) -> list[RequestSpec]:
    workload = read_workload(args.workload)
    count = token_counter(args.model)
    n = min(args.requests, len(workload.requests))
    starts = arrivals.poisson(args.rate, n, args.seed)
    out = []
    for i, start in enumerate(starts):
        text = render(workload, i)
        messages = [{"role": "user", "content": text}]
        out.append(RequestSpec(i, messages, count(text), args.max_tokens, start))
    return out


def scrape(base_url: str) -> dict[str, float]:
    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for name, pattern in _METRICS.items():
        found = re.search(pattern, text, re.M)
        out[name] = float(found.group(1)) if found else 0.0
    return out


def run(args: argparse.Namespace) -> ServingRun:
    result = ServingRun(
        machine=f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.kvshare_serving " + " ".join(args.argv),
        model=args.model.name,
        kv_cache_mb=args.kv_cache_mb,
        requests=args.requests,
        rate=args.rate,
        max_tokens=args.max_tokens,
        recompute=args.recompute,
    )
    requests = specs(args)
    for way in args.ways:
        env = {
            "DUET_MODEL": str(args.model.resolve()),
            "DUET_KV_CACHE_MB": str(args.kv_cache_mb),
            "DUET_SPAN_REUSE": WAYS[way],
            "DUET_SPAN_RECOMPUTE": str(args.recompute),
        }
        var_dir = args.var_dir / way.replace(" ", "-")
        with serving(env, var_dir, args.port, args.ready_timeout_s) as url:
            results = asyncio.run(
                run_requests(
                    url,
                    args.model.name,
                    requests,
                    endpoint="chat",
                    force_length=True,
                    send_duet_slo=False,
                    drain_timeout_s=args.drain_timeout_s,
                    progress=False,
                )
            )
            metrics = scrape(url)
        ok = [r for r in results if r.ok]
        ends = [r.done_s for r in ok if r.done_s is not None]
        seconds = max(ends) - min(r.sent_s for r in results) if ends else float("nan")
        result.ways[way] = WayRun(
            requests=len(results),
            failed=len(results) - len(ok),
            seconds=seconds,
            throughput=len(ok) / seconds if ends else 0.0,
            ttft_ms=_percentiles([v for r in ok if (v := ttft_ms(r)) is not None]),
            metrics=metrics,
        )
        print(f"{way}: {json.dumps(asdict(result.ways[way]))}", flush=True)
        args.out.write_text(json.dumps(asdict(result), indent=1) + "\n")
        time.sleep(args.pause_s)
    return result


def read(path: Path) -> ServingRun:
    data = json.loads(path.read_text())
    ways = {name: WayRun(**w) for name, w in data.pop("ways").items()}
    return ServingRun(**data, ways=ways)


def report(run: ServingRun) -> str:
    lines = [
        f"`{run.command}`",
        "",
        f"{run.model} on {run.machine}, {run.started}; {run.requests} requests of the reuse "
        f"workload, Poisson at {run.rate} req/s, {run.max_tokens} output tokens each (forced), "
        f"KV cache {run.kv_cache_mb:.0f} MB; span reuse recomputes {run.recompute:.0%}.",
        "",
        "| way | throughput (req/s) | vs exact prefix | TTFT p50 / p90 ms | prompt tokens "
        "cached | spans reused / recomputed | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    base = run.ways.get("exact prefix")
    for name, way in run.ways.items():
        m = way.metrics
        ratio = way.throughput / base.throughput if base and base.throughput else float("nan")
        cached = m["cached_tokens"] / m["prompt_tokens"] if m.get("prompt_tokens") else 0.0
        spans = f"{m['reused']:.0f} / {m['recomputed']:.0f}" if m.get("reused") else "-"
        ttft = way.ttft_ms
        lines.append(
            f"| {name} | {way.throughput:.2f} | {ratio:.2f}x | {ttft.get('p50', 0):.0f} / "
            f"{ttft.get('p90', 0):.0f} | {cached:.0%} | {spans} | {way.failed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stack_arguments(parser, port=8791, var_dir="var/kvshare", drain_timeout_s=600.0)
    parser.add_argument("--workload", type=Path, default=Path("docs/bench/reuse_workload.json"))
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-mb", type=float, default=512.0)
    parser.add_argument("--recompute", type=float, default=0.15)
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS))
    parser.add_argument("--write", type=Path, help="docs/benchmarks.md: rewrite its section")
    parser.add_argument("--report", type=Path, help="only report an earlier --out")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    result = read(args.report) if args.report else run(args)
    text = report(result)
    print(text)
    if args.write:
        write_section(args.write, "kvshare-serving", "KVShare served: throughput", text)


if __name__ == "__main__":
    main()
