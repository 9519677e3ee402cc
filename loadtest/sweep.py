"""Live rate sweeps: one workload run against a server at several request rates, with fresh
arrivals and fresh prompts drawn for each run (a probe), and every run summarized into a point
of a `SweepCurve`.

Two ways to pick the rates: a list given up front (`sweep_rates`), or a search for the highest
rate that still holds an SLO-attainment target (`sweep_to_attainment`, `bisect.find_max_rate`
driving live runs). Every run is a `measure`: send, wait for the answers, summarize."""

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from duetserve.loadtest import arrivals
from duetserve.loadtest.bisect import MaxRate, find_max_rate
from duetserve.loadtest.client import run_requests
from duetserve.loadtest.metrics import Summary, summarize
from duetserve.loadtest.plots import SweepCurve, SweepPoint
from duetserve.loadtest.spec import RequestResult, RequestSpec, SloSpec
from duetserve.loadtest.streaming import Endpoint
from duetserve.loadtest.workloads import assign_arrivals

OpenArrival = Literal["poisson", "gamma"]


@dataclass(frozen=True, slots=True)
class Target:
    """The server and how to talk to it (`client.run_requests`'s options)."""

    base_url: str
    model: str
    api_key: str | None = None
    endpoint: Endpoint = "completions"
    force_length: bool = True
    send_duet_slo: bool = True
    duration_limit_s: float | None = None
    drain_timeout_s: float = 60.0
    progress: bool = True


DrawWorkload = Callable[[int], Sequence[RequestSpec]]  # seed -> specs (their arrivals replaced)
PROBE_SEED_STRIDE = 2**32  # probe k draws its prompts with seed + k * this


@dataclass(frozen=True, slots=True)
class OpenLoad:
    """A workload sent open-loop, one probe (run) per rate. Probe k (0 for the sweep's first
    run) sends `draw(workload_seed(k))` with arrivals drawn for its rate from `seed` (Poisson,
    or gamma with `burstiness`). With `fresh_prompts`, every probe has prompts of its own, so a
    server's prefix cache cannot answer one probe from an earlier one; without, every probe
    resends `draw(seed)`. Either way the same sweep sends the same requests every time."""

    draw: DrawWorkload
    arrival: OpenArrival = "poisson"
    burstiness: float = 1.0
    seed: int = 0
    default_slo: SloSpec | None = None
    label: str = "duet"
    pause_s: float = 1.0  # between two runs, for the server to settle
    fresh_prompts: bool = True

    def workload_seed(self, probe: int) -> int:
        """`seed` for probe 0 (what `run --seed` sends too), then seed + probe * 2**32: distinct
        for every probe, and from every seed under 2**32."""
        return self.seed + probe * PROBE_SEED_STRIDE if self.fresh_prompts else self.seed

    def at_rate(self, rate: float, probe: int) -> list[RequestSpec]:
        specs = self.draw(self.workload_seed(probe))
        n = len(specs)
        if self.arrival == "gamma":
            times = arrivals.gamma(rate, self.burstiness, n, self.seed)
        else:
            times = arrivals.poisson(rate, n, self.seed)
        return assign_arrivals(specs, times)


class Measured(NamedTuple):
    results: list[RequestResult]
    duration_s: float  # wall time from the first send to the last answer (or the cut-off)


@dataclass(slots=True)
class SweepResult:
    curve: SweepCurve
    max_rate: MaxRate | None = None  # for a search: what it found
    runs: dict[float, Measured] = field(default_factory=dict)  # rate -> its requests


async def measure(
    target: Target, specs: Sequence[RequestSpec], max_concurrency: int | None = None
) -> Measured:
    """One live run of `specs` as they are (their arrivals, their SLOs)."""
    started = time.monotonic()
    results = await run_requests(
        target.base_url,
        target.model,
        specs,
        api_key=target.api_key,
        endpoint=target.endpoint,
        max_concurrency=max_concurrency,
        duration_limit_s=target.duration_limit_s,
        drain_timeout_s=target.drain_timeout_s,
        force_length=target.force_length,
        send_duet_slo=target.send_duet_slo,
        progress=target.progress,
    )
    return Measured(results, max(time.monotonic() - started, 1e-9))


def error_counts(results: Sequence[RequestResult]) -> dict[str, int]:
    """How many requests failed for each reason (a sweep keeps no per-request rows)."""
    return dict(Counter(r.error for r in results if r.error is not None))


async def measure_rate(
    target: Target, load: OpenLoad, rate: float, probe: int
) -> tuple[Summary, Measured]:
    """Probe number `probe` of a sweep, at `rate`."""
    measured = await measure(target, load.at_rate(rate, probe))
    return summarize(measured.results, measured.duration_s, load.default_slo), measured


async def sweep_rates(target: Target, load: OpenLoad, rates: Sequence[float]) -> SweepResult:
    """Run the workload at each rate, lowest first."""
    sweep = SweepResult(SweepCurve(load.label))
    for number, rate in enumerate(sorted(rates)):
        if number:
            await asyncio.sleep(load.pause_s)
        summary, measured = await measure_rate(target, load, rate, number)
        sweep.curve.points.append(SweepPoint(rate, summary, error_counts(measured.results)))
        sweep.runs[rate] = measured
    return sweep


async def sweep_to_attainment(
    target: Target,
    load: OpenLoad,
    goal: float = 0.9,
    lo: float = 1.0,
    hi: float | None = None,
    tolerance: float = 0.05,
    max_probes: int = 12,
) -> SweepResult:
    """The highest rate holding `goal` SLO attainment (`bisect.find_max_rate`'s search), and
    every rate it probed as the curve. The search is synchronous: it runs in a thread, and
    each probe is a live run on this event loop."""
    loop = asyncio.get_running_loop()
    sweep = SweepResult(SweepCurve(load.label))

    def probe(rate: float) -> float:
        if sweep.runs:
            time.sleep(load.pause_s)
        number = len(sweep.curve.points)
        running = asyncio.run_coroutine_threadsafe(measure_rate(target, load, rate, number), loop)
        summary, measured = running.result()
        sweep.curve.points.append(SweepPoint(rate, summary, error_counts(measured.results)))
        sweep.runs[rate] = measured
        return summary.slo_attainment

    sweep.max_rate = await asyncio.to_thread(
        find_max_rate, probe, goal, lo, hi, tolerance, max_probes
    )
    sweep.curve.points.sort(key=lambda point: point.rate)
    return sweep
