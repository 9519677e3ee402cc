"""The simulator against queues worked out by hand, its bookkeeping, and its cost models."""

import time
from collections.abc import Callable
from typing import get_args

import numpy as np
import pytest

from duetserve.loadtest.metrics import summarize, tpot_ms, ttft_ms
from duetserve.loadtest.sim import (
    CpuProfile,
    FixedCost,
    GpuRooflineProfile,
    StepMeasurement,
    fit_cpu_profile,
    run_simulation,
    simulate,
)
from duetserve.loadtest.sim.cost import H100_HBM_BYTES_PER_S, WEIGHT_BYTES
from duetserve.loadtest.sim.unit import Mode
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.services.scheduler.planner import PlannerConfig

# Work per token dominates; prefill dearer per token than a decode sequence.
SYNTHETIC = CpuProfile(1e-3, 2e-4, 1e-8, 1e-3, 2e-3, 1e-7)


def _spec(index: int, arrival: float, prompt: int, output: int) -> RequestSpec:
    return RequestSpec(index, "x", prompt, output, arrival)


def _random_specs(n: int, rate: float, seed: int = 0) -> list[RequestSpec]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    prompts, outputs = rng.integers(20, 400, n), rng.integers(10, 200, n)
    return [_spec(i, float(arrivals[i]), int(prompts[i]), int(outputs[i])) for i in range(n)]


def test_deterministic_queue_matches_hand_computation() -> None:
    """Arrivals every 1 s, one prefill at a time taking 1.5 s: prefill k starts at 1.5k, so its
    wait is 0.5k and TTFT 1.5 + 0.5k; two decode steps of 0.25 s follow on an idle worker."""
    specs = [_spec(k, float(k), 10, 3) for k in range(6)]
    results = simulate(
        specs,
        FixedCost(prefill_step_s=1.5, decode_step_s=0.25),
        planner_config=PlannerConfig(max_prefill_seqs=1),
    )
    for k, result in enumerate(results):
        assert ttft_ms(result) == pytest.approx(1500 + 500 * k)
        assert result.done_s is not None
        assert (result.done_s - result.sent_s) * 1000 == pytest.approx(2000 + 500 * k)
        assert tpot_ms(result) == pytest.approx(250)
        assert result.output_tokens == 3 and len(result.token_times_s) == 3


@pytest.mark.parametrize("mode", get_args(Mode))
def test_every_request_completes_and_no_block_leaks(mode: Mode) -> None:
    specs = _random_specs(60, rate=200.0)
    sim = run_simulation(specs, SYNTHETIC, mode=mode, num_blocks=48, transfer_s_per_token=1e-6)
    assert sim.preemptions > 0  # the small pool forces recompute
    assert sim.leaked_blocks == 0
    for result, spec in zip(sim.results, specs, strict=True):
        assert result.ok, result.error
        assert result.output_tokens == spec.output_tokens
        assert len(result.token_times_s) == spec.output_tokens
        assert result.token_times_s == sorted(result.token_times_s)
    assert summarize(sim.results, duration_s=sim.end_s).ok == len(specs)


def test_prompt_larger_than_the_pool_is_rejected() -> None:
    results = simulate([_spec(0, 0.0, 10_000, 4)], SYNTHETIC, num_blocks=16)
    assert not results[0].ok and results[0].error is not None and "KV" in results[0].error


def _p50(results: list[RequestResult], metric: Callable[[RequestResult], float | None]) -> float:
    values = [v for r in results if (v := metric(r)) is not None]
    return float(np.percentile(values, 50))


def test_semi_pd_shares_move_ttft_and_tpot_against_unified() -> None:
    """Decode on its own share is not slowed by prompts: semi-PD's TPOT beats unified's. A
    small prefill share makes prompts wait: its TTFT is worse than unified's, which runs
    prompts on the whole device; a larger prefill share lowers TTFT and raises TPOT."""
    specs = _random_specs(150, rate=25.0, seed=1)
    unified = simulate(specs, SYNTHETIC, mode="unified")
    small = simulate(specs, SYNTHETIC, share=(0.3, 0.7))
    large = simulate(specs, SYNTHETIC, share=(0.7, 0.3))
    assert _p50(small, tpot_ms) < _p50(unified, tpot_ms)
    assert _p50(small, ttft_ms) > _p50(unified, ttft_ms)
    assert _p50(large, ttft_ms) < _p50(small, ttft_ms)
    assert _p50(large, tpot_ms) > _p50(small, tpot_ms)


def test_gpu_decode_batch_one_is_weight_streaming() -> None:
    gpu = GpuRooflineProfile()
    step = gpu.decode_s(1, 100, 1.0)
    floor = WEIGHT_BYTES / H100_HBM_BYTES_PER_S
    assert floor < step <= floor / gpu.bandwidth_efficiency * 1.01 + gpu.step_overhead_s
    assert gpu.decode_s(1, 100, 0.5) > step  # bandwidth shared with the share
    assert gpu.prefill_s(4096, 4096 * 2048, 1.0) > gpu.prefill_s(512, 512 * 256, 1.0)
    assert gpu.kv_blocks(16) > 10_000


def test_fit_cpu_profile_recovers_linear_coefficients() -> None:
    truth = CpuProfile(2e-3, 1e-4, 1e-8, 3e-3, 5e-4, 2e-7)
    shapes = [(64, 2080), (256, 32896), (1024, 524800), (512, 65792), (128, 8256)]
    rows = [StepMeasurement("prefill", t, c, truth.prefill_s(t, c, 1.0)) for t, c in shapes]
    rows += [
        StepMeasurement("decode", s, c, truth.decode_s(s, c, 1.0))
        for s, c in [(1, 128), (8, 2048), (32, 8192), (32, 32768), (16, 4096)]
    ]
    fitted = fit_cpu_profile(rows)
    for name in truth.__slots__:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6, abs=1e-12)


def test_scale_smoke_four_units_high_rate() -> None:
    specs = _random_specs(400, rate=400.0, seed=2)
    start = time.perf_counter()
    sim = run_simulation(specs, GpuRooflineProfile(), units=4, num_blocks=2048)
    assert time.perf_counter() - start < 5.0
    assert all(r.ok for r in sim.results)
    assert sim.leaked_blocks == 0
    assert sim.decisions.count > 0 and sim.decisions.mean_us > 0


def test_fit_uses_the_share_rows_ran_at_and_measures_contention() -> None:
    """Rows timed on half the machine fit the whole machine's coefficients; rows timed beside
    the other kind of step give each kind's slowdown."""
    truth = CpuProfile(2e-3, 1e-4, 1e-8, 3e-3, 5e-4, 2e-7)
    prefill = [(64, 2080), (256, 32896), (1024, 524800), (512, 65792)]
    decode = [(1, 128), (8, 2048), (32, 8192), (16, 4096)]
    rows = [StepMeasurement("prefill", t, c, truth.prefill_s(t, c, 0.5), 0.5) for t, c in prefill]
    rows += [StepMeasurement("decode", s, c, truth.decode_s(s, c, 0.5), 0.5) for s, c in decode]
    rows += [
        r._replace(seconds=r.seconds * 1.25, contended=True) for r in rows if r.kind == "prefill"
    ]
    rows += [r._replace(seconds=r.seconds * 1.1, contended=True) for r in rows[4:8]]
    fitted = fit_cpu_profile(rows)
    for name in ("prefill_per_token_s", "decode_per_seq_s", "decode_base_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    assert fitted.prefill_contention == pytest.approx(1.25)
    assert fitted.decode_contention == pytest.approx(1.1)
    assert fit_cpu_profile(rows[:8]).prefill_contention == 1.0


def test_contention_slows_a_step_only_while_the_other_worker_is_busy() -> None:
    """One request alone: its prefill runs with decode idle (no slowdown), its decode steps with
    prefill idle. Two at once: the second's prefill overlaps the first's decode."""
    profile = CpuProfile(0.0, 1e-3, 0.0, 0.01, 0.0, 0.0, prefill_contention=2.0)
    alone = simulate([_spec(0, 0.0, 100, 3)], profile, share=(1.0, 1.0))[0]
    assert ttft_ms(alone) == pytest.approx(100)
    pair = simulate([_spec(0, 0.0, 100, 50), _spec(1, 0.15, 100, 3)], profile, share=(1.0, 1.0))
    assert ttft_ms(pair[1]) == pytest.approx(200)


def test_replay_serves_a_live_runs_requests_and_compares_percentiles() -> None:
    """A run file made from a simulation, replayed on the same cost model, predicts itself."""
    from duetserve.loadtest.report import make_run
    from duetserve.loadtest.sim.replay import compare, predicted_summary, replay

    specs = _random_specs(30, rate=2.0, seed=4)
    sim = run_simulation(specs, SYNTHETIC, num_blocks=512)
    run = make_run({"rate": 2.0}, sim.results, sim.end_s)
    rows = compare(run.summary, predicted_summary(replay(run, SYNTHETIC, num_blocks=512)))
    assert [(c.metric, c.stat) for c in rows] == [
        ("ttft", "p50"), ("ttft", "p90"), ("tpot", "p50"), ("tpot", "p90"),
    ]  # fmt: skip
    assert all(abs(c.error) < 1e-9 for c in rows)
    slower = replay(run, CpuProfile(1e-3, 4e-4, 1e-8, 1e-3, 2e-3, 1e-7), num_blocks=512)
    assert compare(run.summary, predicted_summary(slower))[0].error > 0.2


def test_the_partition_controller_runs_in_the_simulator_as_live() -> None:
    """Prompts dear, decodes cheap, a TTFT target out of reach: the controller moves compute
    to prefill (to its bound at most); with lax targets it holds the split where it started."""
    from duetserve.services.scheduler.split_controller import SplitControllerConfig

    specs = _random_specs(300, rate=40.0, seed=5)
    strict = SplitControllerConfig(ttft_slo_s=1e-4, tpot_slo_s=10.0, window_samples=16)
    sim = run_simulation(specs, SYNTHETIC, num_blocks=4096, controller=strict)
    assert sim.split_moves >= 1 and sim.final_splits[0] > 0.5
    assert sim.final_splits[0] <= strict.max_share
    assert all(r.ok for r in sim.results) and sim.leaked_blocks == 0
    lax = SplitControllerConfig(ttft_slo_s=100.0, tpot_slo_s=100.0, window_samples=16)
    held = run_simulation(specs, SYNTHETIC, num_blocks=4096, controller=lax)
    assert held.split_moves == 0 and held.final_splits == (0.5,)


def test_mode_comparison_sets_slos_from_unified_alone_and_finds_rates() -> None:
    from duetserve.loadtest.sim.modes import Bench, ModeResult, Setting, format_results

    specs = [_spec(i, 0.0, 1500, 10) for i in range(40)]  # one prompt per prefill batch
    bench = Bench(specs, FixedCost(prefill_step_s=0.1, decode_step_s=0.01), 4096, 0.0)
    slo = bench.single_request_slo(7.5)
    assert slo.ttft_ms == pytest.approx(750.0) and slo.tpot_ms == pytest.approx(75.0)
    unified = bench.max_rate(Setting("unified", "unified"), slo, lo=1.0)
    assert unified.rate > 0 and unified.converged
    assert bench.attainment(Setting("unified", "unified"), 1000.0, slo) < 0.9
    table = format_results("tight", slo, [ModeResult("unified", unified)])
    assert "| unified |" in table and "1.00x" in table


def test_policies_run_in_the_simulator_without_seeing_true_lengths() -> None:
    """Every request asks for one max_tokens and ends at its own length; the planner sees the
    cap and the bounds it is given, and JITServe ranks with the unit's measured rates."""
    from duetserve.loadtest.sim.engine import _group_starts, _targets
    from duetserve.loadtest.spec import SloSpec
    from duetserve.services.scheduler.policy.jitserve import JitServePolicy

    specs = _random_specs(80, rate=400.0, seed=3)
    deadline = SloSpec("deadline", deadline_ms=2000.0)
    specs = [
        RequestSpec(s.index, s.prompt, s.prompt_tokens, s.output_tokens, s.arrival_s, deadline)
        for s in specs
    ]
    seen: list[int] = []
    original = JitServePolicy.rank

    def spy(self, unit, now, batch_size, rates):  # type: ignore[no-untyped-def]
        seen.extend(s.max_tokens for s in unit.waiting)
        assert rates is None or rates.line is not None  # measured by the unit itself
        return original(self, unit, now, batch_size, rates)

    JitServePolicy.rank = spy  # type: ignore[method-assign]
    try:
        sim = run_simulation(
            specs,
            SYNTHETIC,
            mode="unified",
            num_blocks=4096,
            policy="jitserve",
            max_tokens=512,
            bounds=[300] * len(specs),
        )
    finally:
        JitServePolicy.rank = original  # type: ignore[method-assign]
    assert set(seen) == {512}
    assert [r.output_tokens for r in sim.results] == [s.output_tokens for s in specs]
    assert all(r.ok for r in sim.results) and sim.leaked_blocks == 0
    assert sim.decisions.count > 0
    # A compound member's deadline counts from its group's first arrival.
    group = SloSpec("compound", deadline_ms=1000.0, group="g")
    members = [RequestSpec(i, "x", 10, 10, 0.5 * i, group) for i in range(3)]
    starts = _group_starts(members)
    targets = _targets(members[2], starts["g"])
    assert targets is not None and targets.deadline_at == pytest.approx(1.0)
    assert _targets(RequestSpec(9, "x", 10, 10, 3.0, deadline), None).deadline_at == 5.0


def test_fairness_runs_in_the_simulator_by_tenant() -> None:
    """A heavy tenant's backlog, then a light tenant's few requests: under FCFS they wait
    behind the whole backlog; under virtual token counters the light ones start as soon as
    places come free (the live scheduler's rule, on the simulated unit)."""
    from dataclasses import replace

    heavy = [RequestSpec(i, "x", 200, 400, 0.001 * i, tenant="heavy") for i in range(40)]
    light = [RequestSpec(40 + i, "y", 200, 400, 0.5 + 0.001 * i, tenant="light") for i in range(4)]
    specs = [replace(s, index=i) for i, s in enumerate(heavy + light)]
    ttft_p99 = {}
    for fairness in ("none", "vtc"):
        sim = run_simulation(
            specs,
            SYNTHETIC,
            mode="unified",
            planner_config=PlannerConfig(max_running=4),
            num_blocks=4096,
            fairness=fairness,
        )
        assert all(r.ok for r in sim.results) and sim.leaked_blocks == 0
        light_ttfts = [ttft_ms(r) for r in sim.results if r.spec.tenant == "light"]
        ttft_p99[fairness] = max(t for t in light_ttfts if t is not None)
    assert ttft_p99["vtc"] < ttft_p99["none"] / 3, ttft_p99


@pytest.mark.parametrize("mode", ["semi-pd", "unified"])
def test_preemption_swaps_to_the_host_tier_when_cheaper_and_every_block_comes_back(
    mode: Mode,
) -> None:
    """The same churn as above with a host tier: preemptions swap (copying a token's KV costs
    less than prefilling it on this profile), nothing is recomputed, every request ends whole,
    and both tiers get every block back."""
    specs = _random_specs(60, rate=200.0)
    recompute = run_simulation(specs, SYNTHETIC, mode=mode, num_blocks=48)
    swap = run_simulation(
        specs, SYNTHETIC, mode=mode, num_blocks=48, host_blocks=512, swap_s_per_token=1e-6
    )
    assert recompute.swaps == 0 and recompute.preemptions > 0
    assert swap.preemptions > 0 and swap.swaps == swap.preemptions
    assert swap.leaked_blocks == 0
    for result, spec in zip(swap.results, specs, strict=True):
        assert result.ok, result.error
        assert result.output_tokens == spec.output_tokens
    # A swap costs microseconds where a recompute re-prefills: swapped requests come back sooner.
    assert swap.end_s < recompute.end_s


def test_no_swap_when_a_copy_costs_more_than_a_prefill_or_the_host_tier_is_full() -> None:
    specs = _random_specs(60, rate=200.0)
    dear = run_simulation(specs, SYNTHETIC, num_blocks=48, host_blocks=512, swap_s_per_token=1.0)
    assert dear.preemptions > 0 and dear.swaps < dear.preemptions
    tiny = run_simulation(specs, SYNTHETIC, num_blocks=48, host_blocks=1, swap_s_per_token=1e-6)
    assert tiny.preemptions > 0 and tiny.swaps == 0
    assert dear.leaked_blocks == tiny.leaked_blocks == 0
