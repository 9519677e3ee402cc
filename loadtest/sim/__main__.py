"""Simulate a cluster on a ShareGPT-like workload and print the live run's report.

    python -m duetserve.loadtest.sim --units 64 --rate 5000 --seconds 3 --mode semi-pd

Also prints the wall time of each scheduling decision (`Planner.plan`), mean and p99.
"""

import argparse

from duetserve.loadtest.arrivals import poisson
from duetserve.loadtest.metrics import summarize
from duetserve.loadtest.report import format_summary
from duetserve.loadtest.sim.cost import GpuRooflineProfile
from duetserve.loadtest.sim.engine import run_simulation
from duetserve.loadtest.sim.unit import Mode
from duetserve.loadtest.workloads import assign_arrivals, sharegpt_like
from duetserve.services.scheduler.planner import PlannerConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--units", type=int, default=1)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second (Poisson)")
    parser.add_argument("--seconds", type=float, default=10.0, help="arrivals span this long")
    parser.add_argument("--mode", choices=["semi-pd", "unified", "disagg"], default="semi-pd")
    parser.add_argument("--share", default="0.5,0.5", help="prefill,decode compute shares")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = int(args.rate * args.seconds)
    specs = assign_arrivals(sharegpt_like(n, seed=args.seed), poisson(args.rate, n, args.seed))
    prefill_share, decode_share = (float(v) for v in args.share.split(","))
    profile = GpuRooflineProfile()
    config = PlannerConfig()
    mode: Mode = args.mode
    sim = run_simulation(
        specs,
        profile,
        units=args.units,
        mode=mode,
        share=(prefill_share, decode_share),
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


if __name__ == "__main__":
    main()
