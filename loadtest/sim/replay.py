"""Replay a live run in the simulator and compare: the simulator's validation.

The live run file holds every request's arrival time, prompt and answer length, so the
simulator serves exactly those requests (same times, same sizes) on one unit with a cost
profile, and the predicted TTFT and TPOT percentiles are set beside the measured ones.

    python -m duetserve.loadtest.sim replay docs/bench/simval_live_rate0.5.json \\
        --profile docs/bench/cpu_profile_float32.json
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from duetserve.loadtest.metrics import Percentiles, Summary, summarize, ttft_ms
from duetserve.loadtest.report import Run
from duetserve.loadtest.sim.cost import CostModel, CpuProfile, StepMeasurement, host_factors
from duetserve.loadtest.sim.engine import Simulation, run_simulation
from duetserve.loadtest.sim.unit import Mode
from duetserve.loadtest.spec import RequestSpec
from duetserve.services.scheduler.planner import PlannerConfig

METRICS = ("ttft", "tpot")
STATS = ("p50", "p90")


@dataclass(frozen=True, slots=True)
class Comparison:
    metric: str  # ttft | tpot
    stat: str  # p50 | p90
    measured_ms: float
    predicted_ms: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_ms - self.measured_ms) / self.measured_ms


def live_specs(run: Run) -> list[RequestSpec]:
    """The requests of a live run as they were asked (the measured ones only when they
    finished; a failed request is still offered, as it was live)."""
    specs = []
    for row in run.requests:
        spec = row.to_result().spec
        specs.append(replace(spec, arrival_s=row.sent_s))
    return specs


def replay(
    run: Run,
    profile: CostModel,
    mode: Mode = "semi-pd",
    share: tuple[float, float] = (0.5, 0.5),
    num_blocks: int = 4096,
    planner_config: PlannerConfig | None = None,
) -> Simulation:
    """The run's requests on one simulated unit (a calibrated profile's dispatch delay
    included)."""
    return run_simulation(
        live_specs(run),
        profile,
        1,
        mode,
        share,
        planner_config or PlannerConfig(),
        num_blocks,
        dispatch_s=profile.dispatch_s if isinstance(profile, CpuProfile) else 0.0,
    )


def calibrate(
    profile: CpuProfile,
    live_steps: Sequence[StepMeasurement],
    run: Run,
    share: tuple[float, float] = (0.5, 0.5),
    num_blocks: int = 4096,
    planner_config: PlannerConfig | None = None,
) -> CpuProfile:
    """A profile timed alone, fitted to a live stack: host factors from the steps its workers
    logged, then the dispatch delay as the median gap between the run's measured TTFTs and the
    ones the factored profile predicts for the same requests. Validate on other runs."""
    factored = replace(host_factors(profile, live_steps), dispatch_s=0.0)
    sim = replay(run, factored, "semi-pd", share, num_blocks, planner_config)
    gaps = [
        live - predicted
        for row, result in zip(run.requests, sim.results, strict=True)
        if row.ttft_ms is not None and (predicted := ttft_ms(result)) is not None
        for live in [row.ttft_ms]
    ]
    return replace(factored, dispatch_s=max(float(np.median(gaps)), 0.0) / 1000 if gaps else 0.0)


def compare(measured: Summary, predicted: Summary) -> list[Comparison]:
    rows = []
    for metric in METRICS:
        live: Percentiles | None = getattr(measured, metric)
        sim: Percentiles | None = getattr(predicted, metric)
        if live is None or sim is None:
            raise ValueError(f"no {metric} in one of the two runs")
        for stat in STATS:
            rows.append(Comparison(metric, stat, getattr(live, stat), getattr(sim, stat)))
    return rows


def predicted_summary(simulation: Simulation) -> Summary:
    return summarize(simulation.results, simulation.end_s)


def format_comparisons(columns: Sequence[tuple[str, list[Comparison]]]) -> str:
    """A markdown table: one row per run, measured / predicted / error for each statistic."""
    first = columns[0][1]
    head = ["run", *(f"{c.metric.upper()} {c.stat} live / sim (ms)" for c in first)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rows in columns:
        cells = [f"{c.measured_ms:.1f} / {c.predicted_ms:.1f} ({c.error:+.0%})" for c in rows]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)
