"""The three modes live on this machine: each setup (DUET_MODE=unified, disagg, semi-pd with
the partition controller, semi-pd at static splits) is started with the launcher, serves the
same Poisson probes, and is stopped; the requests are kept whole, so attainment at any SLO,
the max rate at 90% and the end-to-end latencies are computed afterwards, with plots.

The SLOs follow semi-PD's method: multiples (7.5x tight, 10x loose) of the mean TTFT and TPOT
that `unified` gives one request at a time, measured first, on the same server the unified
probes then run against. The controller of `semi-pd:dynamic` is given the tight SLO. Every
probe draws fresh prompts (its own seed), so a prefix cache never answers a probe from an
earlier one.

    python -m duetserve.loadtest.modes_live run --mix sharegpt-like --rates 1,2,4,6,8 \\
        --num-requests 48 --out docs/bench/modes_live_sharegpt.json
    python -m duetserve.loadtest.modes_live report docs/bench/modes_live_sharegpt.json \\
        --plot docs/bench/modes_live_sharegpt.png

A setup can be run again later against the same SLOs (`--baseline-ms` from the first run, a
name like `semi-pd:dynamic@v2`) and reported together (`report first.json second.json`).
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from duetserve.loadtest import arrivals
from duetserve.loadtest.metrics import e2e_ms, tpot_ms, ttft_ms
from duetserve.loadtest.servers import running_server
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.loadtest.sweep import Target, measure
from duetserve.loadtest.text import CountTokens, token_counter
from duetserve.loadtest.workloads import (
    assign_arrivals,
    long_prompt,
    over_context,
    sharegpt_like,
)
from duetserve.runtime.config import ModelConfig

TIGHT, LOOSE = 7.5, 10.0
TARGET = 0.9
BASELINE = "unified"
Workload = Callable[[int, int], list[RequestSpec]]  # (n, seed) -> specs


# --- what a run keeps ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One request as measured (latencies in ms; None where it failed or had one token)."""

    prompt_tokens: int
    output_tokens: int
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None
    error: str | None = None

    @classmethod
    def of(cls, result: RequestResult) -> "Row":
        return cls(
            result.spec.prompt_tokens,
            result.output_tokens,
            ttft_ms(result),
            tpot_ms(result),
            e2e_ms(result),
            result.error,
        )


@dataclass(slots=True)
class Probe:
    rate: float
    duration_s: float
    rows: list[Row]


@dataclass(slots=True)
class SetupRun:
    name: str
    env: dict[str, str]
    probes: list[Probe] = field(default_factory=list)


@dataclass(slots=True)
class ModesRun:
    mix: str
    model: str
    baseline_ttft_ms: float  # unified, one request at a time: the mean
    baseline_tpot_ms: float
    setups: list[SetupRun] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> "ModesRun":
        setups = []
        for setup in data["setups"]:  # type: ignore[attr-defined]
            probes = [
                Probe(p["rate"], p["duration_s"], [Row(**r) for r in p["rows"]])
                for p in setup["probes"]
            ]
            setups.append(SetupRun(setup["name"], dict(setup["env"]), probes))
        return cls(
            str(data["mix"]),
            str(data["model"]),
            float(data["baseline_ttft_ms"]),  # type: ignore[arg-type]
            float(data["baseline_tpot_ms"]),  # type: ignore[arg-type]
            setups,
        )


# --- analysis (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_ms: float
    tpot_ms: float

    @classmethod
    def times(cls, run: ModesRun, factor: float) -> "Slo":
        return cls(factor * run.baseline_ttft_ms, factor * run.baseline_tpot_ms)


def attainment(rows: Sequence[Row], slo: Slo) -> float:
    """Share of the requests that finished within both latencies (failures count against; a
    one-token answer meets TPOT)."""
    if not rows:
        return 0.0
    met = sum(
        r.error is None
        and r.ttft_ms is not None
        and r.ttft_ms <= slo.ttft_ms
        and (r.tpot_ms is None or r.tpot_ms <= slo.tpot_ms)
        for r in rows
    )
    return met / len(rows)


@dataclass(frozen=True, slots=True)
class MaxRate:
    rate: float
    bound: str = ""  # "≥": every probe held; "<": none did; "": interpolated

    def __str__(self) -> str:
        return f"{self.bound}{self.rate:.3g}"


def max_rate(probes: Sequence[Probe], slo: Slo, target: float = TARGET) -> MaxRate:
    """The highest rate holding `target` attainment: linear between the last probe that held
    and the first that did not (probes by rate)."""
    ordered = sorted(probes, key=lambda p: p.rate)
    if not ordered:
        raise ValueError("no probes")
    shares = [attainment(p.rows, slo) for p in ordered]
    if shares[0] < target:
        return MaxRate(ordered[0].rate, "<")
    for i in range(1, len(ordered)):
        if shares[i] < target:
            low, high = ordered[i - 1].rate, ordered[i].rate
            fraction = (shares[i - 1] - target) / (shares[i - 1] - shares[i])
            return MaxRate(low + fraction * (high - low))
    return MaxRate(ordered[-1].rate, "≥")


def e2e_stats(rows: Sequence[Row]) -> tuple[float, float]:
    """Mean and p99 end-to-end latency (ms) of the finished requests (nan for none)."""
    values = [r.e2e_ms for r in rows if r.e2e_ms is not None]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.percentile(values, 99))


def output_throughput(probe: Probe) -> float:
    return sum(r.output_tokens for r in probe.rows if r.error is None) / probe.duration_s


def best_static(run: ModesRun, slo: Slo) -> SetupRun | None:
    """The semi-pd static split with the highest max rate (ties: the lower E2E mean)."""
    static = [
        s
        for s in run.setups
        if s.name.startswith("semi-pd:") and not s.name.startswith("semi-pd:dynamic")
    ]
    if not static:
        return None

    def key(setup: SetupRun) -> tuple[float, float]:
        top = max(setup.probes, key=lambda p: p.rate)
        return max_rate(setup.probes, slo).rate, -e2e_stats(top.rows)[0]

    return max(static, key=key)


def report(run: ModesRun) -> str:
    """Markdown: the SLOs, max rate per setup at both, then per rate attainment, throughput,
    mean and p99 E2E."""
    slos = {"tight": Slo.times(run, TIGHT), "loose": Slo.times(run, LOOSE)}
    lines = [
        f"{run.mix}, `{run.model}`: unified alone TTFT {run.baseline_ttft_ms:.0f} ms, TPOT "
        f"{run.baseline_tpot_ms:.1f} ms (means). Tight SLO {slos['tight'].ttft_ms:.0f} / "
        f"{slos['tight'].tpot_ms:.1f} ms, loose {slos['loose'].ttft_ms:.0f} / "
        f"{slos['loose'].tpot_ms:.1f} ms.",
        "",
        "| setup | max rate, tight (req/s) | max rate, loose (req/s) |",
        "|---|---|---|",
    ]
    for setup in run.setups:
        rates = [str(max_rate(setup.probes, slo)) for slo in slos.values()]
        lines.append(f"| {setup.name} | {rates[0]} | {rates[1]} |")
    for name, slo in slos.items():
        best = best_static(run, slo)
        if best is not None:
            lines.append(f"\nBest static split at the {name} SLO: {best.name}.")
    lines += [
        "",
        "Per rate: attainment tight / loose (%), output tok/s, E2E mean / p99 (ms), failed.",
        "",
        "| setup | rate | attainment | tok/s | E2E mean / p99 | failed |",
        "|---|---|---|---|---|---|",
    ]
    for setup in run.setups:
        for probe in sorted(setup.probes, key=lambda p: p.rate):
            shares = "/".join(f"{100 * attainment(probe.rows, s):.0f}" for s in slos.values())
            mean, p99 = e2e_stats(probe.rows)
            failed = sum(r.error is not None for r in probe.rows)
            lines.append(
                f"| {setup.name} | {probe.rate:g} | {shares} | {output_throughput(probe):.0f} "
                f"| {mean:,.0f} / {p99:,.0f} | {failed} |"
            )
    return "\n".join(lines)


def plot(run: ModesRun, path: Path) -> Path:
    """Attainment at both SLOs, mean and p99 E2E, against the rate; a colour per setup."""
    slos = {"tight": Slo.times(run, TIGHT), "loose": Slo.times(run, LOOSE)}
    figure = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, 2)
    for number, setup in enumerate(run.setups):
        probes = sorted(setup.probes, key=lambda p: p.rate)
        rates = [p.rate for p in probes]
        style = {"marker": "o", "markersize": 3, "color": f"C{number}", "label": setup.name}
        for axes, slo in zip(grid[0], slos.values(), strict=True):
            axes.plot(rates, [100 * attainment(p.rows, slo) for p in probes], **style)
        stats = [e2e_stats(p.rows) for p in probes]
        grid[1][0].plot(rates, [s[0] / 1000 for s in stats], **style)
        grid[1][1].plot(rates, [s[1] / 1000 for s in stats], **style)
    for axes, (name, slo) in zip(grid[0], slos.items(), strict=True):
        axes.axhline(100 * TARGET, color="grey", linestyle=":")
        axes.set_title(
            f"SLO attainment, {name} (TTFT {slo.ttft_ms:.0f} ms, TPOT {slo.tpot_ms:.1f} ms)"
        )
        axes.set_ylim(0, 102)
    grid[1][0].set_title("E2E latency, mean (s)")
    grid[1][1].set_title("E2E latency, p99 (s)")
    for axes in (*grid[0], *grid[1]):
        axes.set_xlabel("request rate (req/s)")
        axes.grid(True, alpha=0.3)
    grid[0][0].legend(fontsize="small")
    figure.suptitle(f"Modes live: {run.mix}, {run.model}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


# --- running the setups -------------------------------------------------------------------


def setup_env(name: str, tight: Slo) -> dict[str, str]:
    """The DUET_ settings a setup name stands for: unified, disagg, semi-pd:dynamic or
    semi-pd:<prefill share>, each optionally with an "@label" (a second run of a setup)."""
    name = name.partition("@")[0]
    if name in ("unified", "disagg"):
        return {"DUET_MODE": name, "DUET_SPLIT_CONTROL": "static", "DUET_PREFILL_SHARE": "0.5"}
    mode, _, split = name.partition(":")
    if mode != "semi-pd":
        raise ValueError(f"unknown setup {name!r}")
    if split == "dynamic":
        return {
            "DUET_MODE": "semi-pd",
            "DUET_SPLIT_CONTROL": "slo",
            "DUET_PREFILL_SHARE": "0.5",
            # the server's default SLO, which the controller keeps for requests without one
            "DUET_DEFAULT_TTFT_MS": f"{tight.ttft_ms:.1f}",
            "DUET_DEFAULT_TPOT_MS": f"{tight.tpot_ms:.1f}",
        }
    share = float(split)
    if not 0 < share < 1:
        raise ValueError(f"a static split is a prefill share in (0, 1), got {split!r}")
    return {"DUET_MODE": "semi-pd", "DUET_SPLIT_CONTROL": "static", "DUET_PREFILL_SHARE": split}


def add_stack_arguments(
    parser: argparse.ArgumentParser, port: int, var_dir: str, drain_timeout_s: float
) -> None:
    """The options every live benchmark command that starts its own stacks shares: the model,
    the seed, where the stack listens and keeps its files, how long to wait for it to be
    ready and for the last answers, the pause between runs, and the JSON to write."""
    parser.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--var-dir", type=Path, default=Path(var_dir))
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--drain-timeout-s", type=float, default=drain_timeout_s)
    parser.add_argument("--pause-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, required=True)


@contextlib.contextmanager
def serving(env: Mapping[str, str], var_dir: Path, port: int, timeout_s: float) -> Iterator[str]:
    """The stack started by the launcher with `env`; its API base URL until the block ends,
    then stopped (SIGINT: each service drains; killed after a minute)."""
    full = {
        **os.environ,
        **env,
        "DUET_PORT": str(port),
        "DUET_NATS_PORT": "0",
        "DUET_VAR_DIR": str(var_dir),
    }
    command = [sys.executable, "-m", "duetserve.services.launcher"]
    base = f"http://127.0.0.1:{port}"
    with running_server(command, full, var_dir / "launcher.out", f"{base}/health", timeout_s):
        yield f"{base}/v1"


def workload_for(mix: str, model_dir: Path) -> Workload:
    """The mix's requests, counted with the model's tokenizer, each fitting its context."""
    count = token_counter(model_dir)
    context = ModelConfig.from_dir(model_dir).max_context_len
    if mix == "sharegpt-like":
        return lambda n, seed: within_context(sharegpt_like, n, seed, count, context)
    if mix == "long-prompt":
        return lambda n, seed: within_context(long_prompt, n, seed, count, context)
    raise ValueError(f"unknown mix {mix!r}")


def within_context(
    draw: Callable[[int, int, CountTokens], list[RequestSpec]],
    n: int,
    seed: int,
    count: CountTokens,
    context: int,
) -> list[RequestSpec]:
    """`n` requests of the mix that fit `context` (`workloads.over_context`'s test): requests
    that would not are drawn again, not cut, so the ones sent keep
    the mix's shape below the cap. (long-prompt draws prompts up to 4,096 tokens, a `small`
    model's whole context; a server rightly answers those with a 400.)"""
    fits: list[RequestSpec] = []
    for attempt in range(8):
        drawn = draw(2 * n, seed * 8 + attempt, count)
        over = {spec.index for spec in over_context(drawn, context)}
        fits += [spec for spec in drawn if spec.index not in over]
        if len(fits) >= n:
            return [replace(spec, index=i) for i, spec in enumerate(fits[:n])]
    raise ValueError(f"the mix rarely fits a context of {context} tokens")


async def _probe(target: Target, specs: list[RequestSpec], rate: float, seed: int) -> Probe:
    timed = assign_arrivals(specs, arrivals.poisson(rate, len(specs), seed))
    measured = await measure(target, timed)
    return Probe(rate, measured.duration_s, [Row.of(r) for r in measured.results])


async def _baseline(target: Target, specs: list[RequestSpec]) -> tuple[float, float]:
    measured = await measure(target, specs, max_concurrency=1)
    rows = [Row.of(r) for r in measured.results]
    ttfts = [r.ttft_ms for r in rows if r.ttft_ms is not None]
    tpots = [r.tpot_ms for r in rows if r.tpot_ms is not None]
    if len(ttfts) < len(rows) or not tpots:
        raise RuntimeError(f"the one-at-a-time baseline failed: {[r.error for r in rows]}")
    return float(np.mean(ttfts)), float(np.mean(tpots))


def run_modes(args: argparse.Namespace) -> ModesRun:
    workload = workload_for(args.mix, args.model)
    rates = sorted(args.rates)
    names = args.setups
    run: ModesRun | None = None
    if args.baseline_ms is not None:
        run = ModesRun(args.mix, args.model.name, *args.baseline_ms)
    elif names[0] != BASELINE:
        raise ValueError(
            "the first setup must be unified (it measures the SLOs' baseline), or "
            "give --baseline-ms"
        )
    for index, name in enumerate(names):
        tight = Slo.times(run, TIGHT) if run is not None else Slo(1.0, 1.0)
        env = {
            "DUET_MODEL": str(args.model.resolve()),
            "DUET_DTYPE": args.dtype,
            **setup_env(name, tight),
        }
        var_dir = args.var_dir / f"{index}-{name.replace(':', '-')}"
        with serving(env, var_dir, args.port, args.ready_timeout_s) as base_url:
            model = args.model.name
            if run is None:
                target = Target(base_url, model, send_duet_slo=False, progress=False)
                baseline = asyncio.run(_baseline(target, workload(args.baseline_requests, 10**6)))
                run = ModesRun(args.mix, model, *baseline)
                print(f"baseline: TTFT {baseline[0]:.0f} ms, TPOT {baseline[1]:.1f} ms", flush=True)
            setup = SetupRun(name, env)
            for number, rate in enumerate(rates):
                limit = args.num_requests / rate + args.drain_timeout_s
                target = Target(
                    base_url,
                    model,
                    send_duet_slo=False,
                    progress=False,
                    duration_limit_s=limit,
                    drain_timeout_s=args.drain_timeout_s,
                )
                specs = workload(args.num_requests, args.seed + 1000 * (number + 1))
                probe = asyncio.run(_probe(target, specs, rate, args.seed + number))
                setup.probes.append(probe)
                slo = Slo.times(run, TIGHT)
                print(
                    f"{name} @ {rate:g} req/s: attainment (tight) "
                    f"{100 * attainment(probe.rows, slo):.0f}%, "
                    f"{sum(r.error is not None for r in probe.rows)} failed, "
                    f"{probe.duration_s:.0f} s",
                    flush=True,
                )
                time.sleep(args.pause_s)
            run.setups.append(setup)
        if args.out is not None:  # saved after each setup: a long run's progress survives
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(run.to_json(), indent=1))
    assert run is not None
    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m duetserve.loadtest.modes_live")
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="start each setup, probe it, stop it")
    go.add_argument("--mix", choices=("sharegpt-like", "long-prompt"), default="sharegpt-like")
    go.add_argument("--model", type=Path, default=Path("models/small"))
    go.add_argument("--dtype", default="float32")
    go.add_argument(
        "--setups",
        type=lambda text: text.split(","),
        default=[
            "unified",
            "disagg",
            "semi-pd:dynamic",
            "semi-pd:0.3",
            "semi-pd:0.5",
            "semi-pd:0.7",
        ],
        help="comma-separated: unified (first), disagg, semi-pd:dynamic, semi-pd:<share>",
    )
    go.add_argument(
        "--rates", type=lambda text: [float(r) for r in text.split(",")], default=[1, 2, 4, 8]
    )
    go.add_argument("--num-requests", type=int, default=48)
    go.add_argument("--baseline-requests", type=int, default=8)
    go.add_argument(
        "--baseline-ms",
        type=lambda text: [float(v) for v in text.split(",")],
        help="TTFT,TPOT of unified alone from an earlier run (the first setup need not be "
        "unified then)",
    )
    go.add_argument("--seed", type=int, default=0)
    go.add_argument("--drain-timeout-s", type=float, default=60.0)
    go.add_argument("--pause-s", type=float, default=2.0)
    go.add_argument("--port", type=int, default=8000)
    go.add_argument("--ready-timeout-s", type=float, default=180.0)
    go.add_argument("--var-dir", type=Path, default=Path(".var/modes_live"))
    go.add_argument("--out", type=Path)
    go.add_argument("--plot", type=Path)
    show = commands.add_parser("report", help="tables (and a plot) from saved runs")
    show.add_argument("paths", type=Path, nargs="+", help="later runs' setups join the first's")
    show.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        run = run_modes(args)
    else:
        run = ModesRun.from_json(json.loads(args.paths[0].read_text()))
        for path in args.paths[1:]:
            more = ModesRun.from_json(json.loads(path.read_text()))
            same_slos = math.isclose(more.baseline_ttft_ms, run.baseline_ttft_ms, rel_tol=1e-3)
            same_slos &= math.isclose(more.baseline_tpot_ms, run.baseline_tpot_ms, rel_tol=1e-3)
            if more.mix != run.mix or not same_slos:
                raise SystemExit(f"{path}: another mix or baseline than {args.paths[0]}")
            run.setups += more.setups
    print(report(run))
    if args.plot is not None:
        print(f"plot: {plot(run, args.plot)}")


if __name__ == "__main__":
    main()
