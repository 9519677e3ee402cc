"""Fairness between tenants, live: a heavy tenant sending `ratio` times the light one's rate,
both on one stack, under FCFS alone and under virtual token counters (DUET_FAIRNESS=vtc).

    python -m duetserve.loadtest.fairness run --heavy-rate 4 --ratio 10 --seconds 40 \\
        --out docs/bench/fairness_smollm2.json
    python -m duetserve.loadtest.fairness report docs/bench/fairness_smollm2.json \\
        --write docs/benchmarks.md --plot docs/bench/fairness_smollm2.png

Held-out ShareGPT questions to the chat endpoint, one max_tokens for all, answers ending at
EOS; no SLO sent (the server's default applies, and does not refuse). Each tenant has its
API key (DUET_API_KEYS). For each run: each tenant's TTFT and TPOT percentiles, and the
service each got over time (prompt tokens at the first token, output tokens as they stream,
weighted 1 and 2 as the counters weigh them), in WINDOW_S windows.
"""

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from duetserve.loadtest import arrivals
from duetserve.loadtest.autotune import token_counter
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.client import run_requests
from duetserve.loadtest.length_train import held_out
from duetserve.loadtest.metrics import tpot_ms, ttft_ms
from duetserve.loadtest.modes_live import add_stack_arguments, serving
from duetserve.loadtest.sharegpt import sharegpt
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.services.scheduler.policy.fairness import OUTPUT_WEIGHT, PROMPT_WEIGHT

TENANTS = ("heavy", "light")
MODES = ("none", "vtc")
WINDOW_S = 5.0


@dataclass(slots=True)
class TenantRun:
    requests: int
    failed: int
    ttft_ms: dict[str, float]  # p50, p90, p99
    tpot_ms: dict[str, float]
    service: list[float]  # weighted tokens served in each WINDOW_S window


@dataclass(slots=True)
class FairnessRun:
    machine: str
    started: str
    command: str
    model: str
    heavy_rate: float
    ratio: float
    seconds: float
    max_tokens: int
    max_running: int = 256
    modes: dict[str, dict[str, TenantRun]] = field(default_factory=dict)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def service_windows(results: list[RequestResult], end_s: float) -> list[float]:
    """Weighted tokens served in each WINDOW_S window from the start."""
    windows = [0.0] * (int(end_s // WINDOW_S) + 1)
    for result in results:
        if not result.token_times_s:
            continue
        first = result.token_times_s[0]
        windows[min(int(first // WINDOW_S), len(windows) - 1)] += (
            PROMPT_WEIGHT * result.spec.prompt_tokens
        )
        for at in result.token_times_s:
            windows[min(int(at // WINDOW_S), len(windows) - 1)] += OUTPUT_WEIGHT
    return windows


def tenant_run(results: list[RequestResult], end_s: float) -> TenantRun:
    ok = [r for r in results if r.ok]
    return TenantRun(
        requests=len(results),
        failed=len(results) - len(ok),
        ttft_ms=_percentiles([v for r in ok if (v := ttft_ms(r)) is not None]),
        tpot_ms=_percentiles([v for r in ok if (v := tpot_ms(r)) is not None]),
        service=service_windows(results, end_s),
    )


def workloads(args: argparse.Namespace) -> dict[str, list[RequestSpec]]:
    """Each tenant's requests: distinct held-out questions, Poisson arrivals over the run."""
    rates = {"heavy": args.heavy_rate, "light": args.heavy_rate / args.ratio}
    counts = {tenant: max(1, round(rate * args.seconds)) for tenant, rate in rates.items()}
    drawn = sharegpt(None, 8 * sum(counts.values()), args.seed, token_counter(args.model))
    questions = [s for s in drawn if isinstance(s.prompt, str) and held_out(s.prompt.strip())]
    out, start = {}, 0
    for number, tenant in enumerate(TENANTS):
        mine = questions[start : start + counts[tenant]]
        start += counts[tenant]
        specs = [replace(s, index=i, output_tokens=args.max_tokens) for i, s in enumerate(mine)]
        times = arrivals.poisson(rates[tenant], len(specs), args.seed + number)
        out[tenant] = [replace(s, arrival_s=t) for s, t in zip(specs, times, strict=True)]
    return out


async def _both(
    url: str, model: str, specs: dict[str, list[RequestSpec]], drain_s: float
) -> dict[str, list[RequestResult]]:
    runs = [
        run_requests(
            url,
            model,
            specs[tenant],
            api_key=f"key-{tenant}",
            endpoint="chat",
            force_length=False,
            send_duet_slo=False,
            drain_timeout_s=drain_s,
            progress=False,
        )
        for tenant in TENANTS
    ]
    results = await asyncio.gather(*runs)
    return dict(zip(TENANTS, results, strict=True))


def run(args: argparse.Namespace) -> FairnessRun:
    result = FairnessRun(
        machine=f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.fairness " + " ".join(args.argv),
        model=args.model.name,
        heavy_rate=args.heavy_rate,
        ratio=args.ratio,
        seconds=args.seconds,
        max_tokens=args.max_tokens,
        max_running=args.max_running,
    )
    specs = workloads(args)
    for mode in args.modes:
        env = {
            "DUET_MODEL": str(args.model.resolve()),
            "DUET_FAIRNESS": mode,
            "DUET_API_KEYS": ",".join(f"key-{t}:{t}" for t in TENANTS),
            "DUET_MAX_RUNNING": str(args.max_running),
        }
        with serving(env, args.var_dir / mode, args.port, args.ready_timeout_s) as url:
            started = time.monotonic()
            results = asyncio.run(_both(url, args.model.name, specs, args.drain_timeout_s))
            end_s = time.monotonic() - started
        result.modes[mode] = {t: tenant_run(results[t], end_s) for t in TENANTS}
        light = result.modes[mode]["light"]
        print(
            f"fairness {mode}: light TTFT p99 {light.ttft_ms.get('p99', float('nan')):.0f} ms, "
            f"TPOT p99 {light.tpot_ms.get('p99', float('nan')):.0f} ms",
            flush=True,
        )
        args.out.write_text(json.dumps(asdict(result), indent=1) + "\n")
        time.sleep(args.pause_s)
    return result


def read(path: Path) -> FairnessRun:
    data = json.loads(path.read_text())
    modes = {
        mode: {tenant: TenantRun(**t) for tenant, t in tenants.items()}
        for mode, tenants in data.pop("modes").items()
    }
    return FairnessRun(**data, modes=modes)


def report(run: FairnessRun) -> str:
    lines = [
        "| fairness | tenant | requests (failed) | TTFT p50 / p99 | TPOT p50 / p99 | service |",
        "|---|---|---|---|---|---|",
    ]
    for mode, tenants in run.modes.items():
        for tenant, t in tenants.items():
            ttft, tpot = t.ttft_ms, t.tpot_ms
            lines.append(
                f"| {mode} | {tenant} | {t.requests} ({t.failed}) | "
                f"{ttft.get('p50', 0):.0f} / {ttft.get('p99', 0):.0f} ms | "
                f"{tpot.get('p50', 0):.0f} / {tpot.get('p99', 0):.0f} ms | "
                f"{sum(t.service):,.0f} |"
            )
    intro = (
        f"Measured {run.started} on {run.machine}; {run.model}. The heavy tenant sends "
        f"{run.heavy_rate:g} req/s, the light one {run.heavy_rate / run.ratio:g} req/s "
        f"({run.ratio:g}:1), for {run.seconds:g} s (Poisson; held-out ShareGPT questions, chat, "
        f"max_tokens {run.max_tokens}, answers ending at EOS; at most {run.max_running} "
        f"running at once, the rest queued; FCFS within a tenant). Service: "
        f"prompt tokens x {PROMPT_WEIGHT:g} + output tokens x {OUTPUT_WEIGHT:g}. "
        f"Command: `{run.command}`."
    )
    return intro + "\n\n" + "\n".join(lines)


def plot(run: FairnessRun, path: Path) -> Path:
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(run.modes), sharey=True)
    for ax, (mode, tenants) in zip(np.atleast_1d(axes), run.modes.items(), strict=True):
        for tenant, t in tenants.items():
            times = [WINDOW_S * (i + 1) for i in range(len(t.service))]
            ax.plot(times, np.cumsum(t.service), label=tenant)
        ax.set_title(f"fairness: {mode}")
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend()
    np.atleast_1d(axes)[0].set_ylabel("weighted tokens served (cumulative)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    add_stack_arguments(go, port=8322, var_dir="/tmp/duet-fairness", drain_timeout_s=120.0)
    go.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    go.add_argument("--heavy-rate", type=float, default=4.0)
    go.add_argument("--ratio", type=float, default=10.0)
    go.add_argument("--seconds", type=float, default=40.0)
    go.add_argument("--max-tokens", type=int, default=256)
    # Requests that run at once (vLLM's max_num_seqs): beyond it they queue, and the order
    # they leave the queue in is what fairness decides.
    go.add_argument("--max-running", type=int, default=16)
    show = sub.add_parser("report")
    show.add_argument("json", type=Path)
    show.add_argument("--write", type=Path, default=None)
    show.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        args.argv = sys.argv[1:] if argv is None else argv
        print(report(run(args)))
        return
    result = read(args.json)
    text = report(result)
    if args.plot is not None:
        plot(result, args.plot)
        where = args.write.parent if args.write is not None else Path.cwd()
        text += f"\n\n![service over time]({os.path.relpath(args.plot, where)})"
    if args.write is not None:
        write_section(args.write, "fairness", "Fairness between tenants", text)
    print(text)


if __name__ == "__main__":
    main()
