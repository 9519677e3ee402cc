"""The scheduling policies in the simulator, at cluster scale: the live policy benchmark's
workload (loadtest/policies.py: held-out ShareGPT questions, latency, deadline and compound SLOs
in thirds, every request asking for one max_tokens) on N units with a cost model, each unit's
planner running the policy as the live scheduler does. An answer ends at its reference
length, which the planner never sees: it sees max_tokens and the length predictor's bound (the
oracle runs see the true length as their bound, as `duet.expected_output_tokens` gives it live).
Each unit measures its own step times and prefill rate for the policy, as a live unit does.

Also reports the wall time of each scheduling decision (`Planner.plan`, the policy's ranking
included), mean and p99.
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from duetserve.common.lengths import LengthPredictor
from duetserve.loadtest.policies import Point, plot_goodput, point, slo_workload
from duetserve.loadtest.sim.cost import CostModel
from duetserve.loadtest.sim.engine import run_simulation
from duetserve.loadtest.sim.unit import Mode
from duetserve.loadtest.spec import RequestSpec
from duetserve.services.scheduler.planner import PlannerConfig

# name: (policy, JITServe's group sizing, lengths the planner sees)
VARIANTS = {
    "fcfs": ("fcfs", "limit", "predicted"),
    "spf": ("spf", "limit", "predicted"),
    "jitserve": ("jitserve", "limit", "predicted"),
    "jitserve-measured": ("jitserve", "measured", "predicted"),
    "jitserve-oracle": ("jitserve", "limit", "oracle"),
}


@dataclass(slots=True)
class SimPoint:
    point: Point
    decision_mean_us: float
    decision_p99_us: float
    decisions: int
    preemptions: int
    wall_s: float


@dataclass(slots=True)
class SimPolicyRun:
    machine: str
    started: str
    command: str
    profile: str
    mode: str
    units: int
    requests: int
    max_tokens: int
    deadline_ms: float
    group_deadline_ms: float
    policies: dict[str, list[SimPoint]] = field(default_factory=dict)


def specs_and_bounds(
    n: int, rate: float, seed: int, args: argparse.Namespace, predictor: LengthPredictor
) -> tuple[list[RequestSpec], list[int]]:
    specs = slo_workload(None, n, rate, seed, args.deadline_ms, args.group_deadline_ms, repeat=True)
    bounds = [predictor.bound(str(s.prompt), args.max_tokens) for s in specs]
    return specs, bounds


def simulate_policy(
    variant: str,
    rate: float,
    specs: list[RequestSpec],
    bounds: list[int],
    profile: CostModel,
    num_blocks: int,
    args: argparse.Namespace,
) -> SimPoint:
    policy, group, lengths = VARIANTS[variant]
    seen = bounds
    if lengths == "oracle":
        seen = [min(s.output_tokens, args.max_tokens) for s in specs]
    mode: Mode = args.mode
    sim = run_simulation(
        specs,
        profile,
        units=args.units,
        mode=mode,
        planner_config=PlannerConfig(),
        num_blocks=num_blocks,
        policy=policy,
        group=group,
        max_tokens=args.max_tokens,
        bounds=seen,
    )
    return SimPoint(
        point(rate, sim.results, sim.end_s),
        sim.decisions.mean_us,
        sim.decisions.p99_us,
        sim.decisions.count,
        sim.preemptions,
        sim.wall_s,
    )


def run(args: argparse.Namespace, profile: CostModel, num_blocks: int) -> SimPolicyRun:
    predictor = LengthPredictor()
    result = SimPolicyRun(
        machine=f"{platform.machine()}, simulated",
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.sim " + " ".join(sys.argv[1:]),
        profile=type(profile).__name__,
        mode=args.mode,
        units=args.units,
        requests=args.requests,
        max_tokens=args.max_tokens,
        deadline_ms=args.deadline_ms,
        group_deadline_ms=args.group_deadline_ms,
    )
    for number, rate in enumerate(args.rates):
        specs, bounds = specs_and_bounds(args.requests, rate, args.seed + number, args, predictor)
        for variant in args.policies:
            simulated = simulate_policy(variant, rate, specs, bounds, profile, num_blocks, args)
            result.policies.setdefault(variant, []).append(simulated)
            p = simulated.point
            print(
                f"{variant} @ {rate:g} req/s: {p.attainment:.1%} within SLO, goodput "
                f"{p.goodput:.1f} req/s, {p.token_goodput:.0f} tok/s; decisions p99 "
                f"{simulated.decision_p99_us:.0f} us ({simulated.wall_s:.0f} s)",
                flush=True,
            )
    return result


def report(run: SimPolicyRun) -> str:
    variants = list(run.policies)
    rates = [p.point.rate for p in run.policies[variants[0]]]
    lines = [
        "| req/s | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for i, rate in enumerate(rates):
        cells = []
        for variant in variants:
            sim = run.policies[variant][i]
            kinds = " / ".join(f"{v:.0%}" for v in sim.point.by_kind.values())
            cells.append(
                f"{sim.point.attainment:.0%} ({kinds}); {sim.point.goodput:.1f} req/s; "
                f"p99 {sim.decision_p99_us / 1000:.2f} ms"
            )
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(run: SimPolicyRun, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(run), indent=1) + "\n")


def read(path: Path) -> SimPolicyRun:
    data = json.loads(path.read_text())
    policies = {
        name: [SimPoint(**{**p, "point": Point(**p["point"])}) for p in points]
        for name, points in data.pop("policies").items()
    }
    return SimPolicyRun(**data, policies=policies)


def plot(run: SimPolicyRun, path: Path) -> Path:
    curves = {
        name: [(p.point.rate, p.point.goodput, p.point.attainment) for p in points]
        for name, points in run.policies.items()
    }
    title = f"Policies simulated: {run.units} units, {run.profile}, {run.mode}"
    return plot_goodput(curves, path, title)
