"""The `run` and `sweep` commands: parsed options in, a table on stdout and files out."""

import argparse
import datetime
import functools
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from duetserve.loadtest import report, workloads
from duetserve.loadtest.arrivals import from_trace
from duetserve.loadtest.bisect import MaxRate
from duetserve.loadtest.client import fetch_model
from duetserve.loadtest.plan import (
    WorkloadChoice,
    arrival_times,
    build_workload,
    check_context,
    default_slo,
    model_context,
    offered_rate,
    parse_slo_classes,
    with_default_slo,
)
from duetserve.loadtest.spec import RequestSpec, SloSpec
from duetserve.loadtest.sweep import OpenLoad, SweepResult, Target, measure, sweep_rates
from duetserve.loadtest.sweep import sweep_to_attainment as search_max_rate
from duetserve.loadtest.text import CountTokens, token_counter

DEFAULT_NUM_REQUESTS = 100


class UsageError(Exception):
    """Options that cannot work together, or input that cannot be read: told, not traced."""


async def run_command(args: argparse.Namespace) -> int:
    if args.arrival == "concurrency" and args.concurrency is None:
        raise UsageError("--arrival concurrency needs --concurrency")
    slo = _default_slo(args)
    _warn_estimated_context(args)
    specs = _guarded(lambda: _run_specs(args, slo))
    target = await _target(args)
    metadata = _metadata(args, target, slo)
    measured = await measure(target, specs, args.concurrency)
    run = report.make_run(
        metadata, measured.results, measured.duration_s, slo, not args.no_token_times
    )
    print(report.format_table({args.label: run.summary}))
    if args.out:
        print(f"results: {report.write_run(args.out, run)}")
    if args.plot:
        rate = _plotted_rate(args, specs, run.summary.request_throughput)
        curve = report.SweepCurve(args.label, [report.SweepPoint(rate, run.summary)])
        print(f"plot: {report.plot_sweep([curve], args.plot, target=None)}")
    return 0 if run.summary.ok else 1


async def sweep_command(args: argparse.Namespace) -> int:
    if args.arrival not in ("poisson", "gamma"):
        raise UsageError("a sweep draws its own arrivals: --arrival poisson or gamma")
    slo = _default_slo(args)
    _warn_estimated_context(args)
    load = _open_load(args, slo)
    target = await _target(args)
    metadata = _metadata(args, target, slo)
    if args.rates:
        sweep = await sweep_rates(target, load, args.rates)
    else:
        sweep = await search_max_rate(
            target,
            load,
            args.target_attainment,
            args.min_rate,
            args.max_rate,
            args.tolerance,
            args.max_probes,
        )
    columns = {f"{point.rate:g} req/s": point.summary for point in sweep.curve.points}
    print(report.format_table(columns))
    if sweep.max_rate is not None:
        print(_max_rate_line(sweep.max_rate, args.target_attainment))
    for point in sweep.curve.points:
        for reason, count in point.errors.items():
            print(f"failed at {point.rate:g} req/s: {count} x {reason}")
    _write_sweep(args, metadata, sweep)
    return 0 if any(point.summary.ok for point in sweep.curve.points) else 1


def _open_load(args: argparse.Namespace, slo: SloSpec | None) -> OpenLoad:
    """The sweep's workload, drawn for each probe's seed (`OpenLoad.workload_seed`), and drawn
    once here so that options that cannot work fail before the first run."""
    choice = _workload_choice(args)

    @functools.cache
    def draw(seed: int) -> list[RequestSpec]:
        return _guarded(lambda: with_default_slo(build_workload(replace(choice, seed=seed)), slo))

    draw(args.seed)
    return OpenLoad(
        draw,
        args.arrival,
        args.burstiness,
        args.seed,
        slo,
        args.label,
        args.pause_s,
        fresh_prompts=not args.same_prompts,
    )


def _plotted_rate(args: argparse.Namespace, specs: list[RequestSpec], throughput: float) -> float:
    """The rate asked for; else what the arrivals offered; else (all at once) what was served."""
    if args.arrival in ("poisson", "gamma") and args.rate is not None:
        return float(args.rate)
    return offered_rate(specs) or throughput


def _write_sweep(args: argparse.Namespace, metadata: dict[str, object], sweep: SweepResult) -> None:
    if sweep.max_rate is not None:
        metadata["max_rate"] = sweep.max_rate.rate
        metadata["converged"] = sweep.max_rate.converged
    if args.out:
        print(f"results: {report.write_sweep(args.out, report.Sweep(metadata, [sweep.curve]))}")
    if args.plot:
        goal = args.target_attainment
        print(f"plot: {report.plot_sweep([sweep.curve], args.plot, target=goal)}")


def _max_rate_line(found: MaxRate, goal: float) -> str:
    state = "converged" if found.converged else "not converged: raise --max-probes"
    return f"\nhighest rate holding {goal:.0%} SLO attainment: {found.rate:.2f} req/s ({state})"


def _guarded(build: Callable[[], list[RequestSpec]]) -> list[RequestSpec]:
    try:
        specs = build()
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    if not specs:
        raise UsageError("the workload has no requests")
    return specs


def _default_slo(args: argparse.Namespace) -> SloSpec | None:
    try:
        return default_slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_deadline_ms)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _run_specs(args: argparse.Namespace, slo: SloSpec | None) -> list[RequestSpec]:
    if args.arrival == "trace":
        if not args.trace:
            raise ValueError("--arrival trace needs --trace FILE")
        classes = parse_slo_classes(args.slo_class)
        specs = workloads.replay(from_trace(args.trace), classes, args.seed, _counter(args))
        specs = specs[: args.num_requests]
        context = _max_context(args)
        if context is not None:
            check_context(specs, context)
        return with_default_slo(specs, slo)
    specs = build_workload(_workload_choice(args))
    times = arrival_times(args.arrival, len(specs), args.rate, args.burstiness, args.seed)
    return with_default_slo(workloads.assign_arrivals(specs, times), slo)


def _workload_choice(args: argparse.Namespace) -> WorkloadChoice:
    return WorkloadChoice(
        name=args.workload,
        num_requests=args.num_requests or DEFAULT_NUM_REQUESTS,
        seed=args.seed,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        sharegpt_path=Path(args.sharegpt_path) if args.sharegpt_path else None,
        count_tokens=_counter(args),
        max_context=_max_context(args),
    )


def _counter(args: argparse.Namespace) -> CountTokens | None:
    return token_counter(args.tokenizer) if args.tokenizer else None


def _max_context(args: argparse.Namespace) -> int | None:
    """--max-context; else the context in --tokenizer's config.json; else unknown (no cap)."""
    if args.max_context is not None:
        return int(args.max_context)
    return model_context(Path(args.tokenizer)) if args.tokenizer else None


def _warn_estimated_context(args: argparse.Namespace) -> None:
    if args.max_context is not None and not args.tokenizer:
        print(
            "warning: --max-context without --tokenizer caps estimated prompt sizes; the "
            "server's tokenizer may count more",
            file=sys.stderr,
        )


async def _target(args: argparse.Namespace) -> Target:
    model = args.model or await fetch_model(args.base_url, args.api_key)
    return Target(
        base_url=args.base_url,
        model=model,
        api_key=args.api_key,
        endpoint=args.endpoint,
        force_length=not args.no_force_length,
        send_duet_slo=not args.no_duet_slo,
        duration_limit_s=args.duration_limit_s,
        drain_timeout_s=args.drain_timeout_s,
        progress=not args.no_progress,
    )


def _metadata(args: argparse.Namespace, target: Target, slo: SloSpec | None) -> dict[str, object]:
    """What the run was, for whoever reads the file later (the API key left out)."""
    options = {k: v for k, v in vars(args).items() if k not in ("api_key", "command")}
    return {
        "command": args.command,
        "system": args.label,
        "model": target.model,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "default_slo": slo.to_request() if slo else None,
        "max_context": _max_context(args),
        "options": options,
    }
