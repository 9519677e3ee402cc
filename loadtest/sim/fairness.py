"""Fairness between tenants in the simulator, at cluster scale: the live fairness benchmark's
workload (loadtest/fairness.py: a heavy tenant sending `ratio` times the light one's rate,
held-out ShareGPT questions, one max_tokens for all, answers ending at their reference length,
which the planner never sees) on N units with the H100 profile, each unit's planner running
FCFS alone and under virtual token counters, as the live scheduler does (DUET_FAIRNESS=vtc).

Reported as the live run is: each tenant's TTFT and TPOT percentiles and the service it got
over time (weighted as the counters weigh it), plus the scheduling decisions' wall time.
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from duetserve.loadtest import arrivals
from duetserve.loadtest.fairness import TENANTS, FairnessRun, TenantRun, tenant_run
from duetserve.loadtest.length_train import held_out
from duetserve.loadtest.policies import SHAREGPT_DRAWS
from duetserve.loadtest.sharegpt import sharegpt
from duetserve.loadtest.sim.cost import CostModel
from duetserve.loadtest.sim.engine import run_simulation
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.services.scheduler.planner import PlannerConfig


@dataclass(slots=True)
class SimFairnessRun:
    """FairnessRun's fields, for the simulated cluster; and each mode's decision times."""

    run: FairnessRun
    units: int
    profile: str
    decision_p99_us: dict[str, float] = field(default_factory=dict)


def workload(heavy_rate: float, ratio: float, seconds: float, seed: int) -> list[RequestSpec]:
    """Both tenants' requests, by arrival (ids unique across tenants): distinct held-out
    questions while they last, each asking again after that; output_tokens is the reference
    answer's length (where the simulator ends it)."""
    rates = {"heavy": heavy_rate, "light": heavy_rate / ratio}
    counts = {tenant: max(1, round(rate * seconds)) for tenant, rate in rates.items()}
    drawn = sharegpt(None, SHAREGPT_DRAWS, seed)
    questions = [s for s in drawn if isinstance(s.prompt, str) and held_out(s.prompt.strip())]
    specs: list[RequestSpec] = []
    taken = 0
    for number, tenant in enumerate(TENANTS):
        times = arrivals.poisson(rates[tenant], counts[tenant], seed + number)
        for at in times:
            question = questions[taken % len(questions)]
            taken += 1
            specs.append(replace(question, arrival_s=at, tenant=tenant))
    specs.sort(key=lambda s: s.arrival_s)
    return [replace(s, index=i) for i, s in enumerate(specs)]


def run(args: argparse.Namespace, profile: CostModel, num_blocks: int) -> SimFairnessRun:
    live = FairnessRun(
        machine=f"{platform.machine()}, simulated",
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python -m duetserve.loadtest.sim " + " ".join(sys.argv[1:]),
        model="H100 roofline profile",
        heavy_rate=args.heavy_rate,
        ratio=args.ratio,
        seconds=args.seconds,
        max_tokens=args.max_tokens,
        max_running=args.max_running,
    )
    result = SimFairnessRun(live, args.units, type(profile).__name__)
    specs = workload(args.heavy_rate, args.ratio, args.seconds, args.seed)
    for mode in args.modes:
        sim = run_simulation(
            specs,
            profile,
            units=args.units,
            mode=args.mode,
            planner_config=PlannerConfig(max_running=args.max_running),
            num_blocks=num_blocks,
            fairness=mode,
            max_tokens=args.max_tokens,
        )
        by_tenant: dict[str, list[RequestResult]] = {t: [] for t in TENANTS}
        for r in sim.results:
            by_tenant[r.spec.tenant or "default"].append(r)
        live.modes[mode] = {t: tenant_run(rs, sim.end_s) for t, rs in by_tenant.items()}
        result.decision_p99_us[mode] = sim.decisions.p99_us
        light = live.modes[mode]["light"]
        print(
            f"{mode}: light tenant TTFT p99 {light.ttft_ms.get('p99', 0):.0f} ms, TPOT p99 "
            f"{light.tpot_ms.get('p99', 0):.0f} ms; decisions p99 "
            f"{sim.decisions.p99_us:.0f} us ({sim.wall_s:.0f} s)",
            flush=True,
        )
    return result


def write(result: SimFairnessRun, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(result), indent=1) + "\n")


def read(path: Path) -> SimFairnessRun:
    data = json.loads(path.read_text())
    live = data.pop("run")
    modes = {
        mode: {tenant: TenantRun(**t) for tenant, t in tenants.items()}
        for mode, tenants in live.pop("modes").items()
    }
    return SimFairnessRun(FairnessRun(**live, modes=modes), **data)


def report(result: SimFairnessRun) -> str:
    from duetserve.loadtest.fairness import report as live_report

    units = f"; {result.units} simulated units ({result.profile})."
    text = (
        live_report(result.run)
        .replace("; H100 roofline profile.", units)
        .replace("answers ending at EOS", "answers ending at their reference length, unseen")
        .replace("running at once, the rest", "running at once per unit, the rest")
    )
    decisions = ", ".join(
        f"{mode} {us / 1000:.2f} ms" for mode, us in result.decision_p99_us.items()
    )
    return f"{text}\n\nScheduling decisions, p99: {decisions}."
