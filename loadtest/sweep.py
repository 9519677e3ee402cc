"""Live rate sweeps: one workload run against a server at several request rates, with fresh
arrivals drawn for each rate, and every run summarized into a point of a `SweepCurve`.

Two ways to pick the rates: a list given up front (`sweep_rates`), or a search for the highest
rate that still holds an SLO-attainment target (`sweep_to_attainment`, `bisect.find_max_rate`
driving live runs). Every run is a `measure`: send, wait for the answers, summarize."""

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
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


@dataclass(frozen=True, slots=True)
class OpenLoad:
    """A workload sent open-loop: the same specs at every rate, arrivals drawn afresh for each
    (Poisson, or gamma with `burstiness`; the seed is the same at every rate)."""

    specs: Sequence[RequestSpec]
    arrival: OpenArrival = "poisson"
    burstiness: float = 1.0
    seed: int = 0
    default_slo: SloSpec | None = None
    label: str = "duet"
    pause_s: float = 1.0  # between two runs, for the server to settle

    def at_rate(self, rate: float) -> list[RequestSpec]:
        n = len(self.specs)
        if self.arrival == "gamma":
            times = arrivals.gamma(rate, self.burstiness, n, self.seed)
        else:
            times = arrivals.poisson(rate, n, self.seed)
        return assign_arrivals(self.specs, times)


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


async def measure_rate(target: Target, load: OpenLoad, rate: float) -> tuple[Summary, Measured]:
    measured = await measure(target, load.at_rate(rate))
    return summarize(measured.results, measured.duration_s, load.default_slo), measured


async def sweep_rates(target: Target, load: OpenLoad, rates: Sequence[float]) -> SweepResult:
    """Run the workload at each rate, lowest first."""
    sweep = SweepResult(SweepCurve(load.label))
    for number, rate in enumerate(sorted(rates)):
        if number:
            await asyncio.sleep(load.pause_s)
        summary, measured = await measure_rate(target, load, rate)
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
        running = asyncio.run_coroutine_threadsafe(measure_rate(target, load, rate), loop)
        summary, measured = running.result()
        sweep.curve.points.append(SweepPoint(rate, summary, error_counts(measured.results)))
        sweep.runs[rate] = measured
        return summary.slo_attainment

    sweep.max_rate = await asyncio.to_thread(
        find_max_rate, probe, goal, lo, hi, tolerance, max_probes
    )
    sweep.curve.points.sort(key=lambda point: point.rate)
    return sweep
