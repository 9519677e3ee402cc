"""Each request's own latency targets, and the split controller fed latencies over them."""

import pytest

from duetserve.proto.scheduling import Slo, SloKind
from duetserve.services.scheduler.split_controller import SplitController, SplitControllerConfig
from duetserve.services.scheduler.split_tuner import SplitTuner
from duetserve.services.scheduler.targets import tpot_target_s, ttft_target_s


def test_targets_by_kind() -> None:
    latency = Slo(SloKind.LATENCY, ttft_ms=500.0, tpot_ms=50.0)
    deadline = Slo(SloKind.DEADLINE, deadline_ms=8000.0)
    group = Slo(SloKind.COMPOUND, deadline_ms=3000.0, group="g")
    assert (ttft_target_s(latency), tpot_target_s(latency)) == (0.5, 0.05)
    assert (ttft_target_s(deadline), tpot_target_s(deadline)) == (8.0, None)
    assert (ttft_target_s(group), tpot_target_s(group)) == (3.0, None)
    assert ttft_target_s(None) is None and tpot_target_s(None) is None


def test_the_controller_sees_each_latency_against_its_own_requests_target() -> None:
    """Two requests of the same TTFT, one with a loose and one with a tight target: only the
    tight one misses, so half the window misses and the p90 is past 1.0."""
    config = SplitControllerConfig(ttft_slo_s=1.0, tpot_slo_s=1.0, window_samples=2, min_samples=2)
    tuner = SplitTuner(bus=None, unit="u", controller=SplitController(config), prefill_share=0.5)  # type: ignore[arg-type]
    tuner.on_first_token(0.4, 2.0)  # 0.2x of its target
    tuner.on_first_token(0.4, 0.2)  # 2.0x of its target
    tuner.on_first_token(0.4, None)  # no target: no sample
    tuner.on_finished(1.0, 11, 0.5)  # 0.1 s a token over a 0.5 s target: 0.2x
    tuner.on_finished(1.0, 11, 0.05)  # 2.0x
    tuner.on_finished(1.0, 11, None)
    decision = tuner.controller.maybe_decide(0.0)  # type: ignore[union-attr]
    assert decision is not None
    assert decision.num_ttft_samples == 2 and decision.num_tpot_samples == 2
    assert decision.ttft_s == pytest.approx(2.0) and decision.tpot_s == pytest.approx(2.0)


def test_each_finished_request_gives_the_controller_its_pair_over_its_own_targets() -> None:
    """The joint attainment counts a request once, over both of its own targets: a loose TTFT
    with a tight TPOT misses; a request preempted before its first token has no TTFT."""
    config = SplitControllerConfig(ttft_slo_s=1.0, tpot_slo_s=1.0, window_samples=3, min_samples=3)
    tuner = SplitTuner(bus=None, unit="u", controller=SplitController(config), prefill_share=0.5)  # type: ignore[arg-type]
    for ttft_target in (2.0, 2.0, 2.0):
        tuner.on_first_token(0.4, ttft_target)
    tuner.on_finished(1.0, 11, 0.5, ttft_s=0.4, ttft_target_s=2.0)  # (0.2x, 0.2x): met both
    tuner.on_finished(1.0, 11, 0.05, ttft_s=0.4, ttft_target_s=2.0)  # (0.2x, 2.0x): missed
    tuner.on_finished(1.0, 11, 0.5)  # no TTFT measured: (None, 0.2x), met
    decision = tuner.controller.maybe_decide(0.0)  # type: ignore[union-attr]
    assert decision is not None
    assert decision.num_finished == 3 and decision.attainment == pytest.approx(2 / 3)
