"""The simulator's command line.

    python -m duetserve.loadtest.sim cluster --units 64 --rate 5000 --seconds 3 --mode semi-pd
        a cluster on a ShareGPT-like workload with the H100 roofline profile: the report of a
        live run, and the wall time of each scheduling decision (`Planner.plan`), mean and p99
    python -m duetserve.loadtest.sim measure --model models/small --threads 1 \\
        --out docs/bench/cpu_profile_float32.json
        time real steps on this machine and fit a CPU profile
    python -m duetserve.loadtest.sim calibrate --profile PROFILE.json --step-logs DIR \
        --run RUN.json --out LIVE.json
        fit a measured profile to a live stack: the steps its workers logged
        (DUET_STEP_LOG_DIR) and one run's TTFTs
    python -m duetserve.loadtest.sim modes --requests 600
        unified, disagg and semi-pd (best static split, and the partition controller) on an
        8B Llama on one H100: the highest rate each holds at 90% attainment
    python -m duetserve.loadtest.sim policies --units 64 --rates 640,960 --requests 8000 \
        --out docs/bench/sim_policies_gpu.json
        the scheduling policies (FCFS, shortest predicted first, JITServe by the running
        limit, by the measured step line, and with oracle lengths) on the live policy
        benchmark's workload, with the H100 roofline profile; goodput and decision times
    python -m duetserve.loadtest.sim fairness --units 64 --heavy-rate 400 --ratio 10 \
        --seconds 60 --out docs/bench/sim_fairness_gpu.json --plot docs/bench/sim_fairness.png
        two tenants, one sending 10x the other, FCFS alone and under virtual token counters
        (the live fairness benchmark's workload): each tenant's TTFT, TPOT and service
    python -m duetserve.loadtest.sim replay RUN.json [RUN.json ...] --profile PROFILE.json
        serve the requests of live runs in the simulator; predicted vs measured p50/p90 of
        TTFT and TPOT
"""

import argparse
import os
from pathlib import Path

from duetserve.loadtest.arrivals import poisson
from duetserve.loadtest.metrics import summarize
from duetserve.loadtest.report import format_summary, read_run
from duetserve.loadtest.sim import fairness as sim_fairness
from duetserve.loadtest.sim import policies as sim_policies
from duetserve.loadtest.sim.cost import (
    KV_BYTES_PER_TOKEN,
    GpuRooflineProfile,
    StepMeasurement,
    fit_cpu_profile,
    measure_cpu_profile,
    read_cpu_profile,
    read_step_logs,
    write_cpu_profile,
)
from duetserve.loadtest.sim.engine import run_simulation
from duetserve.loadtest.sim.modes import Bench, compare_modes, format_results
from duetserve.loadtest.sim.replay import (
    calibrate,
    compare,
    format_comparisons,
    predicted_summary,
    replay,
)
from duetserve.loadtest.sim.unit import Mode
from duetserve.loadtest.workloads import assign_arrivals, sharegpt_like
from duetserve.services.scheduler.planner import PlannerConfig


def _shares(text: str) -> tuple[float, float]:
    prefill, decode = (float(v) for v in text.split(","))
    return prefill, decode


def cluster(args: argparse.Namespace) -> None:
    n = int(args.rate * args.seconds)
    specs = assign_arrivals(sharegpt_like(n, seed=args.seed), poisson(args.rate, n, args.seed))
    profile = GpuRooflineProfile()
    config = PlannerConfig()
    mode: Mode = args.mode
    sim = run_simulation(
        specs,
        profile,
        units=args.units,
        mode=mode,
        share=_shares(args.share),
        planner_config=config,
        num_blocks=profile.kv_blocks(config.block_size),
        transfer_s_per_token=0.0,
    )
    print(format_summary(summarize(sim.results, sim.end_s), f"simulated {args.mode}"))
    d = sim.decisions
    print(
        f"{n} requests, {args.units} units, simulated {sim.end_s:.1f} s in {sim.wall_s:.1f} s; "
        f"{sim.preemptions} preemptions, {sim.leaked_blocks} leaked blocks\n"
        f"Planner.plan: {d.count} calls, mean {d.mean_us:.1f} us, p99 {d.p99_us:.1f} us"
    )


def measure(args: argparse.Namespace) -> None:
    if args.step_logs is not None:
        rows = read_step_logs(args.step_logs)
        _fit_and_write(rows, {"step_logs": str(args.step_logs)}, args.out, verbose=False)
        return
    if args.model is None:
        raise SystemExit("measure: give --model (time steps here) or --step-logs")
    rows = []
    for threads in args.threads:
        rows += measure_cpu_profile(args.model, args.dtype, threads)
    metadata = {"model": str(args.model), "dtype": args.dtype, "threads": args.threads}
    _fit_and_write(rows, metadata, args.out, verbose=True)


def _fit_and_write(
    rows: list[StepMeasurement], metadata: dict[str, object], out: Path, verbose: bool
) -> None:
    profile = fit_cpu_profile(rows)
    for row in rows if verbose else []:
        fitted = (profile.prefill_s if row.kind == "prefill" else profile.decode_s)(
            row.tokens, row.context, row.share
        )
        print(
            f"{row.kind:7} tokens/seqs {row.tokens:5} context {row.context:7} share "
            f"{row.share:.2f}{' contended' if row.contended else ''}: "
            f"{1e3 * row.seconds:8.1f} ms measured, {1e3 * fitted:8.1f} fitted alone"
        )
    print(f"{len(rows)} steps: {profile}")
    write_cpu_profile(out, profile, rows, metadata)
    print(f"wrote {out}")


def replay_runs(args: argparse.Namespace) -> None:
    profile = read_cpu_profile(args.profile)
    config = PlannerConfig(max_prefill_tokens=args.max_prefill_tokens)
    columns = []
    for path in args.runs:
        run = read_run(path)
        sim = replay(run, profile, args.mode, _shares(args.share), args.num_blocks, config)
        rows = compare(run.summary, predicted_summary(sim))
        options = run.metadata.get("options")
        rate = options.get("rate", "?") if isinstance(options, dict) else "?"
        label = f"{Path(path).stem} ({rate} req/s)"
        columns.append((label, rows))
    print(format_comparisons(columns))
    worst = max(abs(c.error) for _, rows in columns for c in rows)
    print(f"largest error: {worst:.0%}")


def calibrate_profile(args: argparse.Namespace) -> None:
    profile = read_cpu_profile(args.profile)
    live = read_step_logs(args.step_logs)
    run = read_run(args.run)
    config = PlannerConfig(max_prefill_tokens=args.max_prefill_tokens)
    fitted = calibrate(profile, live, run, _shares(args.share), args.num_blocks, config)
    print(
        f"{len(live)} live steps; host factors prefill {fitted.prefill_host_factor:.3f}, "
        f"decode {fitted.decode_host_factor:.3f}; dispatch {1e3 * fitted.dispatch_s:.1f} ms"
    )
    metadata = {"profile": str(args.profile), "step_logs": str(args.step_logs)}
    metadata["run"] = str(args.run)
    write_cpu_profile(args.out, fitted, live, metadata)
    print(f"wrote {args.out}")


def modes(args: argparse.Namespace) -> None:
    profile = GpuRooflineProfile(bandwidth_saturation_share=args.bandwidth_saturation)
    config = PlannerConfig()
    specs = sharegpt_like(args.requests, seed=args.seed)
    bench = Bench(specs, profile, profile.kv_blocks(config.block_size), args.transfer_s_per_token)
    for title, factor in (("tight", 7.5), ("loose", 10.0)):
        slo = bench.single_request_slo(factor)
        results = compare_modes(bench, slo, lo=args.min_rate)
        print(format_results(f"{title} ({factor}x unified alone)", slo, results), end="\n\n")


def policies(args: argparse.Namespace) -> None:
    profile = GpuRooflineProfile()
    unknown = set(args.policies) - set(sim_policies.VARIANTS)
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}: of {list(sim_policies.VARIANTS)}")
    if args.from_json is None and not args.rates:
        raise SystemExit("policies: give --rates (or --from-json with a run written before)")
    if args.from_json is not None:
        run = sim_policies.read(args.from_json)
    else:
        run = sim_policies.run(args, profile, profile.kv_blocks(PlannerConfig().block_size))
    print(sim_policies.report(run))
    if args.out is not None:
        sim_policies.write(run, args.out)
        print(f"wrote {args.out}")
    if args.plot is not None:
        sim_policies.plot(run, args.plot)
        print(f"wrote {args.plot}")


def fairness(args: argparse.Namespace) -> None:
    from duetserve.loadtest.bench_report import write_section
    from duetserve.loadtest.fairness import plot

    if args.from_json is not None:
        result = sim_fairness.read(args.from_json)
    else:
        profile = GpuRooflineProfile()
        result = sim_fairness.run(args, profile, profile.kv_blocks(PlannerConfig().block_size))
    text = sim_fairness.report(result)
    if args.out is not None:
        sim_fairness.write(result, args.out)
    if args.plot is not None:
        plot(result.run, args.plot)
        where = args.write.parent if args.write is not None else Path.cwd()
        text += f"\n\n![service over time]({os.path.relpath(args.plot, where)})"
    if args.write is not None:
        title = "Fairness between tenants, simulated"
        write_section(args.write, "sim-fairness", title, text)
    print(text)


def preemption(args: argparse.Namespace) -> None:
    from duetserve.loadtest.bench_report import write_section
    from duetserve.loadtest.sim import preemption as sim_preemption

    if args.from_json is not None:
        result = sim_preemption.read(args.from_json)
    else:
        profile = GpuRooflineProfile()
        blocks = profile.kv_blocks(PlannerConfig().block_size)
        result = sim_preemption.run(args, profile, blocks)
    text = sim_preemption.report(result)
    if args.out is not None:
        sim_preemption.write(result, args.out)
    if args.plot is not None:
        from duetserve.loadtest.plots import way_plot_link

        title = "Preemption by recompute and by swap, simulated H100 units"
        text += way_plot_link(result.ways, ("ttft_ms", "tpot_ms"), title, args.plot, args.write)
    if args.write is not None:
        title = "Preemption: swap against recompute, simulated"
        write_section(args.write, "sim-preemption", title, text)
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.loadtest.sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("cluster", help="a simulated cluster with the H100 profile")
    one.add_argument("--units", type=int, default=1)
    one.add_argument("--rate", type=float, default=10.0, help="requests per second (Poisson)")
    one.add_argument("--seconds", type=float, default=10.0, help="arrivals span this long")
    one.add_argument("--mode", choices=["semi-pd", "unified", "disagg"], default="semi-pd")
    one.add_argument("--share", default="0.5,0.5", help="prefill,decode compute shares")
    one.add_argument("--seed", type=int, default=0)
    one.set_defaults(handler=cluster)
    fit = commands.add_parser("measure", help="time real steps and fit a CPU profile")
    fit.add_argument("--model", type=Path, help="model directory: time its steps here")
    fit.add_argument(
        "--step-logs", type=Path, help="or fit the steps live workers logged (DUET_STEP_LOG_DIR)"
    )
    fit.add_argument("--dtype", default="float32")
    fit.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="intra-op thread counts to time"
    )
    fit.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    fit.set_defaults(handler=measure)
    back = commands.add_parser("replay", help="simulate live runs' requests and compare")
    back.add_argument("runs", nargs="+", type=Path, help="run files of `loadtest run --out`")
    back.add_argument("--profile", type=Path, required=True, help="from `measure`")
    back.add_argument("--mode", choices=["semi-pd", "unified", "disagg"], default="semi-pd")
    back.set_defaults(handler=replay_runs)
    tune = commands.add_parser(
        "calibrate", help="fit a measured profile to a live stack (its step logs and one run)"
    )
    tune.add_argument("--profile", type=Path, required=True, help="from `measure --model`")
    tune.add_argument("--step-logs", type=Path, required=True, help="DUET_STEP_LOG_DIR of a run")
    tune.add_argument("--run", type=Path, required=True, help="that run's `loadtest run --out`")
    tune.add_argument("--out", type=Path, required=True)
    for sub in (back, tune):
        sub.add_argument("--share", default="0.5,0.5", help="prefill,decode compute shares")
        sub.add_argument(
            "--num-blocks", type=int, default=5461, help="the live pool's KV blocks of 16 tokens"
        )
        sub.add_argument("--max-prefill-tokens", type=int, default=2048)
    tune.set_defaults(handler=calibrate_profile)
    three = commands.add_parser(
        "modes", help="unified, disagg and semi-pd (static, controlled) on the H100 profile"
    )
    three.add_argument("--requests", type=int, default=600, help="per probe")
    three.add_argument("--min-rate", type=float, default=1.0)
    three.add_argument("--seed", type=int, default=0)
    three.add_argument(
        "--bandwidth-saturation",
        type=float,
        default=1.0,
        help="share of the SMs that reaches full HBM bandwidth (1.0: bandwidth proportional "
        "to the share)",
    )
    three.add_argument(
        "--transfer-s-per-token",
        type=float,
        default=KV_BYTES_PER_TOKEN / 25e9,
        help="disagg's KV copy, seconds per token (default: 25 GB/s between the devices)",
    )
    three.set_defaults(handler=modes)
    ranked = commands.add_parser(
        "policies", help="the scheduling policies on mixed SLO kinds, on the H100 profile"
    )
    ranked.add_argument("--units", type=int, default=64)
    ranked.add_argument(
        "--rates", type=_floats, default=[], help="cluster request rates, comma-separated"
    )
    ranked.add_argument("--requests", type=int, default=4000, help="per rate")
    ranked.add_argument(
        "--policies",
        type=lambda text: text.split(","),
        default=list(sim_policies.VARIANTS),
        help=f"comma-separated, of {', '.join(sim_policies.VARIANTS)}",
    )
    ranked.add_argument("--mode", choices=["semi-pd", "unified", "disagg"], default="unified")
    ranked.add_argument("--max-tokens", type=int, default=1024)
    ranked.add_argument("--deadline-ms", type=float, default=10_000.0)
    ranked.add_argument("--group-deadline-ms", type=float, default=20_000.0)
    ranked.add_argument("--seed", type=int, default=0)
    ranked.add_argument("--out", type=Path)
    ranked.add_argument("--plot", type=Path, help="goodput against rate, one line a policy")
    ranked.add_argument(
        "--from-json", type=Path, help="report (and plot) a run written before, run nothing"
    )
    ranked.set_defaults(handler=policies)
    fair = commands.add_parser(
        "fairness", help="FCFS and virtual token counters for two tenants, on the H100 profile"
    )
    fair.add_argument("--units", type=int, default=64)
    fair.add_argument("--heavy-rate", type=float, default=400.0, help="cluster req/s")
    fair.add_argument("--ratio", type=float, default=10.0)
    fair.add_argument("--seconds", type=float, default=60.0)
    fair.add_argument("--max-tokens", type=int, default=1024)
    fair.add_argument("--max-running", type=int, default=16, help="per unit")
    fair.add_argument("--modes", type=lambda t: t.split(","), default=["none", "vtc"])
    fair.add_argument("--mode", choices=["semi-pd", "unified", "disagg"], default="unified")
    fair.add_argument("--seed", type=int, default=0)
    fair.add_argument("--out", type=Path)
    fair.add_argument("--write", type=Path, help="the section of docs/benchmarks.md")
    fair.add_argument("--plot", type=Path, help="each tenant's service over time")
    fair.add_argument("--from-json", type=Path, help="report a run written before")
    fair.set_defaults(handler=fairness)
    swap = commands.add_parser(
        "preemption", help="swap against recompute under fairness churn, on the H100 profile"
    )
    swap.add_argument("--units", type=int, default=16)
    swap.add_argument("--heavy-rate", type=float, default=100.0, help="cluster req/s")
    swap.add_argument("--ratio", type=float, default=10.0)
    swap.add_argument("--seconds", type=float, default=60.0)
    swap.add_argument("--max-tokens", type=int, default=1024)
    swap.add_argument("--max-running", type=int, default=64, help="per unit")
    swap.add_argument("--kv-fraction", type=float, default=0.05, help="of an H100's KV pool")
    swap.add_argument("--host-multiple", type=float, default=4.0, help="host tier / KV pool")
    swap.add_argument("--swap-gbps", type=float, default=25.0, help="PCIe, one way")
    swap.add_argument("--mode", choices=["semi-pd", "unified", "disagg"], default="unified")
    swap.add_argument("--seed", type=int, default=0)
    swap.add_argument("--out", type=Path)
    swap.add_argument("--write", type=Path, help="the section of docs/benchmarks.md")
    swap.add_argument("--plot", type=Path)
    swap.add_argument("--from-json", type=Path, help="report a run written before")
    swap.set_defaults(handler=preemption)
    return parser


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    args = build_parser().parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
