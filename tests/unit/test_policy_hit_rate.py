"""Scheduling by cache hit rate (policy/hit_rate.py): requests that can wait go by how much of
their prompt the cache holds, those whose SLO cannot wait keep the inner policy's order, and
everything but admission order is the inner policy's."""

from duetserve.services.scheduler.planner import Planner, PlannerConfig
from duetserve.services.scheduler.policy import make_policy
from duetserve.services.scheduler.policy.fcfs import FcfsPolicy
from duetserve.services.scheduler.policy.hit_rate import SLACK, WINDOW, HitRatePolicy
from duetserve.services.scheduler.policy.jitserve import STARVED_S
from duetserve.services.scheduler.state import Phase, SeqState, SloTargets, UnitView


def seq(rid: str, arrival: float, hit: float, ttft_s: float | None = None) -> SeqState:
    targets = None if ttft_s is None else SloTargets(ttft_s, None, None)
    return SeqState(rid, arrival, 256, 16, targets=targets, expected_hit=hit)


def order(policy: HitRatePolicy, waiting: list[SeqState], now: float) -> list[str]:
    return [s.request_id for s in policy.admission_order(waiting, now)]


def test_requests_that_can_wait_go_by_hit_rate_the_urgent_keep_their_place() -> None:
    policy = HitRatePolicy(FcfsPolicy())
    waiting = [
        seq("old-miss", 0.0, 0.0, ttft_s=2.0),  # waited 1.5 s of 2: past SLACK, urgent
        seq("miss", 1.0, 0.0, ttft_s=10.0),
        seq("half", 1.1, 0.5, ttft_s=10.0),
        seq("full", 1.2, 0.9),  # no target: may wait
        seq("tie", 1.3, 0.5, ttft_s=10.0),
    ]
    assert SLACK * 2.0 <= 1.5
    assert order(policy, waiting, now=1.5) == ["old-miss", "full", "half", "tie", "miss"]
    # Starving overrides any hit rate: the inner order again.
    late = 1.3 + STARVED_S
    assert order(policy, waiting, now=late) == ["old-miss", "miss", "half", "full", "tie"]


def test_only_a_window_of_the_inner_order_is_reordered() -> None:
    policy = HitRatePolicy(FcfsPolicy())
    waiting = [seq(f"r{i}", float(i) / 100, 0.0) for i in range(WINDOW)]
    waiting.append(seq("hit-past-window", 1.0, 1.0))
    assert order(policy, waiting, now=1.0)[-1] == "hit-past-window"
    assert order(policy, waiting[1:], now=1.0)[0] == "hit-past-window"


def test_it_composes_and_leaves_the_rest_to_the_inner_policy() -> None:
    composed = make_policy("fcfs", "vtc", hit_rate=True)
    assert isinstance(composed.inner, HitRatePolicy)  # type: ignore[attr-defined]
    policy = make_policy("jitserve", hit_rate=True)
    assert policy.name == "jitserve+hit-rate"
    planner = Planner(PlannerConfig(block_size=16, prefill_order="arrival"), policy)
    unit = UnitView(
        free_blocks=40,
        total_blocks=100,
        waiting=[seq("cold", 0.0, 0.0), seq("warm", 0.1, 0.8)],
    )
    plan = planner.plan(unit, now=0.2)
    assert plan.admit[0].request_id == "warm"
    decoding = [SeqState("d", 0.0, 10, 16, phase=Phase.DECODING)]
    inner = FcfsPolicy()
    wrapped = HitRatePolicy(inner)
    assert wrapped.preemption_order(decoding, 1.0) == inner.preemption_order(decoding, 1.0)
    assert wrapped.skip_when_blocked() == inner.skip_when_blocked()
    assert wrapped.running_cap() is None and wrapped.preemptions() == ()
