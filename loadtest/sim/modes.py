"""The three deployment modes side by side in the simulator: the highest Poisson rate each holds
at 90% SLO attainment, the way semi-PD's evaluation compares them.

SLOs are set from `unified` serving one request at a time (mean TTFT and TPOT over the
workload, a multiple of each: 7.5x tight, 10x loose, as the semi-PD paper does). For semi-pd,
every static split on a grid is searched and the best one reported, beside the partition
controller starting from 0.5/0.5. disagg gives each worker a whole device and its own pool
(two devices' worth of hardware for one unit; semi-PD's comparison holds that against a single
device's pair of workers, so its rate is also reported per device).

    python -m duetserve.loadtest.sim modes --requests 600
"""

from collections.abc import Sequence
from dataclasses import dataclass

from duetserve.loadtest.arrivals import poisson
from duetserve.loadtest.bisect import MaxRate, find_max_rate
from duetserve.loadtest.metrics import summarize
from duetserve.loadtest.sim.cost import CostModel
from duetserve.loadtest.sim.engine import run_simulation
from duetserve.loadtest.sim.unit import Mode
from duetserve.loadtest.spec import RequestSpec, SloSpec
from duetserve.loadtest.workloads import assign_arrivals
from duetserve.services.scheduler.planner import PlannerConfig
from duetserve.services.scheduler.split_controller import SplitControllerConfig

STATIC_SPLITS = (0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass(frozen=True, slots=True)
class Setting:
    label: str
    mode: Mode
    share: tuple[float, float] = (0.5, 0.5)
    controlled: bool = False


@dataclass(frozen=True, slots=True)
class ModeResult:
    label: str
    max_rate: MaxRate


@dataclass(frozen=True, slots=True)
class Bench:
    """What every probe shares: the requests (arrival times are drawn per rate), the cost model
    and the unit's memory."""

    specs: Sequence[RequestSpec]
    profile: CostModel
    num_blocks: int
    transfer_s_per_token: float
    seed: int = 0

    def attainment(self, setting: Setting, rate: float, slo: SloSpec) -> float:
        specs = assign_arrivals(self.specs, poisson(rate, len(self.specs), self.seed))
        controller = None
        if setting.controlled:
            controller = SplitControllerConfig(
                ttft_slo_s=(slo.ttft_ms or 0) / 1000, tpot_slo_s=(slo.tpot_ms or 0) / 1000
            )
        sim = run_simulation(
            specs,
            self.profile,
            mode=setting.mode,
            share=setting.share,
            planner_config=PlannerConfig(),
            num_blocks=self.num_blocks,
            transfer_s_per_token=self.transfer_s_per_token,
            controller=controller,
        )
        return summarize(sim.results, sim.end_s, slo).slo_attainment

    def single_request_slo(self, factor: float) -> SloSpec:
        """`factor` x the mean TTFT and TPOT of unified mode serving one request at a time."""
        spaced = [
            RequestSpec(s.index, s.prompt, s.prompt_tokens, s.output_tokens, 1e6 * i)
            for i, s in enumerate(self.specs[:50])
        ]
        sim = run_simulation(spaced, self.profile, mode="unified", num_blocks=self.num_blocks)
        summary = summarize(sim.results, sim.end_s)
        assert summary.ttft is not None and summary.tpot is not None
        return SloSpec("latency", factor * summary.ttft.mean, factor * summary.tpot.mean)

    def max_rate(self, setting: Setting, slo: SloSpec, lo: float) -> MaxRate:
        return find_max_rate(
            lambda rate: self.attainment(setting, rate, slo), 0.9, lo, tolerance=0.03
        )


def compare_modes(bench: Bench, slo: SloSpec, lo: float) -> list[ModeResult]:
    """unified, disagg, semi-pd at its best static split, and semi-pd with the controller."""
    results = [
        ModeResult("unified", bench.max_rate(Setting("unified", "unified"), slo, lo)),
        ModeResult("disagg (2 devices)", bench.max_rate(Setting("disagg", "disagg"), slo, lo)),
    ]
    best: ModeResult | None = None
    for split in STATIC_SPLITS:
        setting = Setting(f"semi-pd {split:.1f}/{1 - split:.1f}", "semi-pd", (split, 1 - split))
        found = ModeResult(setting.label, bench.max_rate(setting, slo, lo))
        if best is None or found.max_rate.rate > best.max_rate.rate:
            best = found
    assert best is not None
    results.append(ModeResult(f"{best.label} (best static)", best.max_rate))
    controlled = Setting("semi-pd, controller", "semi-pd", controlled=True)
    results.append(ModeResult(controlled.label, bench.max_rate(controlled, slo, lo)))
    return results


def format_results(title: str, slo: SloSpec, results: list[ModeResult]) -> str:
    unified = results[0].max_rate.rate
    lines = [
        f"{title}: SLO TTFT {slo.ttft_ms:.0f} ms, TPOT {slo.tpot_ms:.1f} ms",
        "",
        "| mode | max rate at 90% (req/s) | per device | vs unified |",
        "|---|---|---|---|",
    ]
    for result in results:
        rate = result.max_rate.rate
        devices = 2 if result.label.startswith("disagg") else 1
        ratio = rate / unified if unified else float("nan")
        lines.append(f"| {result.label} | {rate:.2f} | {rate / devices:.2f} | {ratio:.2f}x |")
    return "\n".join(lines)
