"""The discrete-event loop: arrivals from RequestSpecs, a router over N units, and each unit's
workers (`unit.py`) driven by the scheduler's real planner and a cost model.

    results = simulate(specs, GpuRooflineProfile(), units=4, mode="semi-pd", share=(0.4, 0.6))
    summary = summarize(results, duration_s=...)

`run_simulation` returns the same results plus the wall time each `Planner.plan` call took.
"""

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from duetserve.loadtest.sim.cost import CostModel
from duetserve.loadtest.sim.unit import Mode, Record, Unit, UnitSetup
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.services.scheduler.planner import Planner, PlannerConfig
from duetserve.services.scheduler.policy import make_policy
from duetserve.services.scheduler.split_controller import SplitController, SplitControllerConfig
from duetserve.services.scheduler.state import SeqState, SloTargets

UNFINISHED = "unfinished when the simulation stopped"


class EventQueue:
    """Actions at simulated times, run in time order (ties in scheduling order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._order = itertools.count()
        self.now = 0.0

    def at(self, when: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._order), action))

    def run(self, until_s: float | None = None) -> None:
        while self._heap and (until_s is None or self._heap[0][0] <= until_s):
            when, _, action = heapq.heappop(self._heap)
            self.now = when
            action(when)


@dataclass(frozen=True, slots=True)
class DecisionTimes:
    """Wall time of the planner's `plan` calls, in microseconds."""

    count: int
    mean_us: float
    p99_us: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "DecisionTimes":
        if not seconds:
            return cls(0, 0.0, 0.0)
        micro = np.asarray(seconds) * 1e6
        return cls(len(seconds), float(micro.mean()), float(np.percentile(micro, 99)))


@dataclass(frozen=True, slots=True)
class Simulation:
    results: list[RequestResult]  # in the order of the specs
    decisions: DecisionTimes
    end_s: float  # simulated time of the last event run
    wall_s: float  # host time the simulation took
    leaked_blocks: int  # blocks not back in the pools at the end (0 when all finished)
    preemptions: int  # times a request gave up its blocks (recomputed or swapped)
    split_moves: int = 0  # times the partition controllers moved a unit's split
    final_splits: tuple[float, ...] = ()  # each unit's prefill share at the end
    swaps: int = 0  # of the preemptions, those that swapped KV out to the host tier


def _record(
    spec: RequestSpec, max_tokens: int | None, bound: int | None, group_start: float | None
) -> Record:
    """Without `max_tokens` the request asks for its own length (a forced-length run); with
    it, every request asks for `max_tokens` and its answer ends at its own length unseen."""
    asked = max(spec.output_tokens, 1) if max_tokens is None else max_tokens
    seq = SeqState(
        str(spec.index),
        spec.arrival_s,
        spec.prompt_tokens,
        asked,
        output_bound=bound,
        targets=_targets(spec, group_start),
        tenant=spec.tenant or "default",
        group=_group(spec),
        group_size=spec.slo.group_size if spec.slo is not None else None,
    )
    result = RequestResult(spec, sent_s=spec.arrival_s)
    return Record(seq, result, spec.prompt_tokens, max(spec.output_tokens, 1))


def _targets(spec: RequestSpec, group_start: float | None) -> SloTargets | None:
    """Its SLO as the planner measures it; a compound member's deadline counts from its
    group's first arrival (which a live scheduler does not know yet: only its ingress)."""
    slo = spec.slo
    if slo is None:
        return None
    if slo.kind == "latency":
        ttft = None if slo.ttft_ms is None else slo.ttft_ms / 1000
        tpot = None if slo.tpot_ms is None else slo.tpot_ms / 1000
        return SloTargets(ttft, tpot, None)
    if slo.deadline_ms is None:
        return None
    start = group_start if slo.kind == "compound" and group_start is not None else spec.arrival_s
    return SloTargets(None, None, start + slo.deadline_ms / 1000)


def _group(spec: RequestSpec) -> str:
    """Its compound group as the live scheduler keys it (scoped by tenant), or ""."""
    slo = spec.slo
    if slo is None or slo.kind != "compound" or slo.group is None:
        return ""
    return f"{spec.tenant or 'default'}\x00{slo.group}"


def _group_starts(specs: Sequence[RequestSpec]) -> dict[str, float]:
    starts: dict[str, float] = {}
    for spec in specs:
        group = spec.slo.group if spec.slo is not None else None
        if group is not None:
            starts[group] = min(starts.get(group, spec.arrival_s), spec.arrival_s)
    return starts


def _least_loaded(units: Sequence[Unit]) -> Unit:
    return min(units, key=lambda unit: unit.load)


def _route(units: Sequence[Unit], record: Record, now: float) -> None:
    _least_loaded(units).add(record, now)


def _leaked(units: Sequence[Unit]) -> int:
    leaked = 0
    for unit in units:
        pools = {id(unit.view): unit.view, id(unit.decode_view): unit.decode_view}
        held = sum(r.seq.num_blocks for r in unit.records.values())
        leaked += sum(p.total_blocks - p.free_blocks for p in pools.values()) - held
        leaked += unit.host_held - sum(r.host_blocks for r in unit.records.values())
    return leaked


def _tick(queue: EventQueue, unit: Unit, interval_s: float, until_s: float) -> None:
    """The controller's timer, while requests can still arrive or run."""

    def tick(now: float) -> None:
        unit.control(now)
        if now < until_s or unit.records:
            queue.at(now + interval_s, tick)

    queue.at(interval_s, tick)


def run_simulation(
    specs: Sequence[RequestSpec],
    profile: CostModel,
    units: int = 1,
    mode: Mode = "semi-pd",
    share: tuple[float, float] = (0.5, 0.5),
    planner_config: PlannerConfig | None = None,
    num_blocks: int = 4096,
    transfer_s_per_token: float = 0.0,
    until_s: float | None = None,
    dispatch_s: float = 0.0,
    controller: SplitControllerConfig | None = None,
    control_interval_s: float = 0.5,
    policy: str = "fcfs",
    fairness: str = "none",
    group: str = "limit",
    max_tokens: int | None = None,
    bounds: Sequence[int | None] | None = None,
    host_blocks: int = 0,
    swap_s_per_token: float = 0.0,
) -> Simulation:
    """Serve `specs` on `units` units of `num_blocks` KV blocks each (disagg: that many per
    worker); each request reaches its unit `dispatch_s` after it is sent. With `controller`
    (semi-pd), each unit runs the scheduler's partition controller every `control_interval_s`,
    starting from `share`. Each unit's planner runs `policy` (with `fairness` and `group`:
    scheduler/policy/). With `max_tokens`, every request asks for that many and ends at its
    spec's length, which the planner does not see; `bounds` (one per spec) are the predicted
    upper bounds of their lengths it sees instead (None: max_tokens).
    With `host_blocks`, each unit has a host tier that size, and preemption swaps KV to it at
    `swap_s_per_token` one way when that costs less than recomputing (sim/unit.py).
    Requests still running at `until_s` fail with UNFINISHED."""
    config = planner_config or PlannerConfig()
    setup = UnitSetup(mode, share, num_blocks, transfer_s_per_token, host_blocks, swap_s_per_token)
    queue = EventQueue()
    cluster = [
        Unit(
            setup,
            Planner(config, make_policy(policy, fairness, config.block_size, group)),
            profile,
            queue.at,
        )
        for _ in range(units)
    ]
    starts = _group_starts(specs)
    bounds = [None] * len(specs) if bounds is None else bounds
    records = [
        _record(spec, max_tokens, bound, starts.get(spec.slo.group or "") if spec.slo else None)
        for spec, bound in zip(specs, bounds, strict=True)
    ]
    for record in records:
        queue.at(record.seq.arrival + dispatch_s, partial(_route, cluster, record))
    if controller is not None and mode == "semi-pd":
        last_arrival = max((r.seq.arrival for r in records), default=0.0)
        starting = replace(controller, initial_split=share[0])  # the controller starts at `share`
        for unit in cluster:
            unit.controller = SplitController(starting)
            _tick(queue, unit, control_interval_s, last_arrival)
    start = time.perf_counter()
    queue.run(until_s)
    wall = time.perf_counter() - start
    for record in records:
        if record.result.done_s is None and record.result.error is None:
            record.result.error = UNFINISHED
            record.result.output_tokens = record.seq.num_output
    seconds = [s for unit in cluster for s in unit.plan_seconds]
    return Simulation(
        results=[r.result for r in records],
        decisions=DecisionTimes.of(seconds),
        end_s=queue.now,
        wall_s=wall,
        leaked_blocks=_leaked(cluster),
        preemptions=sum(r.seq.num_preemptions for r in records),
        split_moves=sum(unit.split_moves for unit in cluster),
        final_splits=tuple(unit.share[0] for unit in cluster),
        swaps=sum(unit.swaps_out for unit in cluster),
    )


def simulate(
    specs: Sequence[RequestSpec],
    profile: CostModel,
    units: int = 1,
    mode: Mode = "semi-pd",
    share: tuple[float, float] = (0.5, 0.5),
    planner_config: PlannerConfig | None = None,
    num_blocks: int = 4096,
    transfer_s_per_token: float = 0.0,
) -> list[RequestResult]:
    """The results of serving `specs` to the end, as a live run would report them."""
    simulation = run_simulation(
        specs, profile, units, mode, share, planner_config, num_blocks, transfer_s_per_token
    )
    return simulation.results
