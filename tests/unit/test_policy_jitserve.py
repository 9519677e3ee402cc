"""The JITServe policy (scheduler/policy/jitserve.py) and shortest-predicted-first on hand-built
units: priorities, the group window, who is admitted first and who is preempted."""

import pytest

from duetserve.services.scheduler.planner import Planner, PlannerConfig
from duetserve.services.scheduler.policy import make_policy
from duetserve.services.scheduler.policy.base import Rates
from duetserve.services.scheduler.policy.jitserve import (
    MAX_PREEMPTIONS,
    STARVED_S,
    JitServePolicy,
    group_size,
    max_step_s,
    priority,
    select_group,
    slo_factor,
    time_left_s,
)
from duetserve.services.scheduler.policy.spf import ShortestPredictedFirstPolicy
from duetserve.services.scheduler.state import Phase, SeqState, SloTargets, UnitView
from duetserve.services.scheduler.step_model import PRIOR_FIXED_SHARE, StepLine, StepModel

RATES = Rates(step_s=0.01, prefill_s_per_token=0.001)  # 10 ms a token out, 1 ms a token in


def seq(
    name: str,
    prompt: int = 100,
    bound: int = 100,
    arrival: float = 0.0,
    targets: SloTargets | None = None,
    phase: Phase = Phase.WAITING,
    output: int = 0,
) -> SeqState:
    computed = prompt if phase == Phase.DECODING else 0
    return SeqState(
        name,
        arrival,
        prompt,
        max_tokens=1000,
        num_computed=computed,
        num_output=output,
        phase=phase,
        output_bound=bound,
        targets=targets,
    )


def test_time_left_is_the_prefill_then_the_expected_output() -> None:
    assert time_left_s(seq("a", prompt=200, bound=50), RATES) == pytest.approx(0.2 + 0.5)
    decoding = seq("b", prompt=200, bound=50, phase=Phase.DECODING, output=20)
    assert time_left_s(decoding, RATES) == pytest.approx(0.3)


def test_less_work_for_the_same_reward_rate_ranks_higher() -> None:
    short, long = seq("s", bound=20), seq("l", bound=400)
    assert priority(short, 0.0, RATES) > priority(long, 0.0, RATES)


def test_a_request_that_will_miss_its_deadline_falls_far_behind_one_that_can_make_it() -> None:
    # Both need 1.1 s; one has 2 s, the other 1 s (10% late).
    makes_it = seq("ok", bound=100, targets=SloTargets(deadline_at=2.0))
    misses = seq("late", bound=100, targets=SloTargets(deadline_at=1.0))
    assert slo_factor(makes_it, 0.0, RATES) == 1.0
    assert slo_factor(misses, 0.0, RATES) < 1e-3
    assert priority(misses, 0.0, RATES) < priority(makes_it, 0.0, RATES) / 1000


def test_ttft_counts_only_until_the_first_token() -> None:
    targets = SloTargets(ttft_s=0.5, tpot_s=0.05)
    waited = seq("w", targets=targets)
    assert slo_factor(waited, 0.3, RATES) == 1.0  # 0.3 s waited + 0.1 s of prefill
    assert slo_factor(waited, 0.6, RATES) < 1e-6
    started = seq("d", targets=targets, phase=Phase.DECODING, output=5)
    assert slo_factor(started, 0.6, RATES) == 1.0
    assert slo_factor(started, 0.6, Rates(0.06, 0.001)) < 1e-6  # steps over its TPOT


def test_the_group_is_the_contiguous_window_by_length_with_the_most_priority() -> None:
    # Four short ones outweigh the rest; the group of two is two of them, not the long one.
    requests = [seq(f"s{i}", bound=10 + i) for i in range(4)] + [seq("long", bound=900)]
    group = select_group(requests, 0.0, batch_size=2, rates=RATES)
    assert [s.request_id for s in group] == ["s0", "s1"]
    assert len(select_group(requests, 0.0, batch_size=8, rates=RATES)) == 5


def test_waiting_members_of_the_group_are_admitted_first() -> None:
    policy = JitServePolicy()
    waiting = [seq("long", bound=900), seq("short", bound=10)]
    unit = UnitView(100, 100, waiting=waiting)
    policy.rank(unit, 0.0, batch_size=1, rates=RATES)
    assert [s.request_id for s in policy.admission_order(waiting, 0.0)] == ["short", "long"]
    assert policy.preemptions() == ()  # nothing runs: no one to preempt


def test_a_request_waiting_too_long_goes_first_whatever_its_priority() -> None:
    policy = JitServePolicy()
    old = seq("old", bound=900, arrival=0.0, targets=SloTargets(deadline_at=1.0))
    new = seq("new", bound=10, arrival=STARVED_S)
    now = STARVED_S + 1
    assert [s.request_id for s in policy.admission_order([new, old], now)] == ["old", "new"]


def test_a_full_unit_preempts_decoding_requests_outside_the_group_a_few_at_a_time() -> None:
    policy = JitServePolicy()
    decoding = [seq(f"d{i}", bound=800, phase=Phase.DECODING, output=10) for i in range(4)]
    waiting = [seq(f"w{i}", bound=10) for i in range(4)]
    unit = UnitView(0, 100, waiting=waiting, decoding=decoding)
    policy.rank(unit, 0.0, batch_size=4, rates=RATES)
    victims = policy.preemptions()
    assert len(victims) == MAX_PREEMPTIONS and set(victims) <= {s.request_id for s in decoding}
    assert policy.preemptions() == ()  # handed out once
    policy.rank(unit, 0.1, batch_size=4, rates=RATES)  # before the next ranking: nothing new
    assert policy.preemptions() == ()
    # Room for everyone: no preemption, whatever the priorities.
    roomy = JitServePolicy()
    roomy.rank(unit, 0.0, batch_size=16, rates=RATES)
    assert roomy.preemptions() == ()


def test_memory_preempts_the_lowest_priority_first() -> None:
    policy = JitServePolicy()
    cheap = seq("cheap", bound=20, phase=Phase.DECODING, output=10)
    costly = seq("costly", bound=900, phase=Phase.DECODING, output=10)
    assert [s.request_id for s in policy.preemption_order([cheap, costly], 0.0)] == [
        "costly",
        "cheap",
    ]


def test_shortest_predicted_first_orders_by_work_left() -> None:
    policy = ShortestPredictedFirstPolicy()
    requests = [seq("a", prompt=10, bound=300), seq("b", prompt=1000, bound=10), seq("c", 10, 5)]
    policy.rank(UnitView(10, 10), 0.0, 4, RATES)
    assert [s.request_id for s in policy.admission_order(requests, 0.0)] == ["c", "b", "a"]
    assert [s.request_id for s in policy.preemption_order(requests, 0.0)] == ["a", "b", "c"]


def test_the_planner_admits_past_a_prompt_that_does_not_fit_under_jitserve() -> None:
    config = PlannerConfig(block_size=16)
    big, small = seq("big", prompt=1600, bound=10), seq("small", prompt=100, bound=500)
    unit = UnitView(free_blocks=10, total_blocks=200, waiting=[big, small])
    fcfs = Planner(config, make_policy("fcfs")).plan(unit, 0.0)
    assert fcfs.admit == ()  # big first, and it does not fit
    jitserve = Planner(config, make_policy("jitserve")).plan(unit, 0.0)
    assert [a.request_id for a in jitserve.admit] == ["small"]
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lottery")


# A step of 10 ms plus 1 ms a request: a batch of k steps in (10 + k) ms.
LINE = StepLine(fixed_s=0.010, per_request_s=0.001)
LINED = Rates(step_s=0.02, prefill_s_per_token=0.001, line=LINE)


def deadline_seq(name: str, deadline_at: float, bound: int = 100) -> SeqState:
    return seq(name, prompt=10, bound=bound, targets=SloTargets(deadline_at=deadline_at))


def test_the_group_is_as_large_as_keeps_its_members_within_their_slos() -> None:
    # 100 tokens in 2.005 s (after a 10 ms prefill): steps of 20 ms at most, so a batch of 10.
    requests = [deadline_seq(f"r{i}", deadline_at=2.015) for i in range(30)]
    assert max_step_s(requests[0], 0.0, LINED) == pytest.approx(0.02005)
    assert group_size(requests, 0.0, ceiling=256, rates=LINED) == 10
    # A looser deadline for all: 30 ms steps, 20 at once.
    relaxed = [deadline_seq(f"r{i}", deadline_at=3.015) for i in range(30)]
    assert group_size(relaxed, 0.0, ceiling=256, rates=LINED) == 20
    # The unit's own limit still holds.
    assert group_size(relaxed, 0.0, ceiling=8, rates=LINED) == 8


def test_no_cap_when_everyone_fits_or_nobody_can_make_it() -> None:
    loose = [deadline_seq(f"r{i}", deadline_at=60.0) for i in range(30)]
    assert group_size(loose, 0.0, ceiling=256, rates=LINED) == 256
    hopeless = [deadline_seq(f"r{i}", deadline_at=0.5) for i in range(30)]
    assert max_step_s(hopeless[0], 0.0, LINED) < LINE.at(1)
    assert group_size(hopeless, 0.0, ceiling=256, rates=LINED) == 256
    # Unmeasured: no line, no cap.
    tight = [deadline_seq(f"r{i}", deadline_at=2.015) for i in range(30)]
    assert group_size(tight, 0.0, ceiling=256, rates=RATES) == 256


def test_requests_that_cannot_make_it_are_not_worth_slowing_those_that_can() -> None:
    # 10 deadline requests that make it at steps up to 20 ms (a batch of 10); 10 that cannot
    # at any step; latency requests with a 25 ms TPOT (a batch of 15) but twice the work
    # left, so ranked after the deadlines. At 10 all 10 deadlines are met; at 15 only 5
    # latency ones (the deadlines miss at a batch of 15).
    makes_it = [deadline_seq(f"ok{i}", deadline_at=2.015) for i in range(10)]
    hopeless = [deadline_seq(f"late{i}", deadline_at=0.2) for i in range(10)]
    latency = [seq(f"lat{i}", 10, bound=200, targets=SloTargets(tpot_s=0.025)) for i in range(10)]
    size = group_size([*hopeless, *latency, *makes_it], 0.0, ceiling=256, rates=LINED)
    assert size == 10
    # Without the deadlines, the latency requests and the hopeless: 10 latency ones at once.
    assert group_size([*hopeless, *latency], 0.0, ceiling=256, rates=LINED) == 15
    policy = JitServePolicy(group="measured")
    unit = UnitView(1000, 1000, waiting=[*hopeless, *makes_it])
    policy.rank(unit, 0.0, batch_size=256, rates=LINED)
    assert policy.running_cap() == 10
    by_limit = JitServePolicy()  # the default: the group is as large as the running limit
    by_limit.rank(unit, 0.0, batch_size=256, rates=LINED)
    assert by_limit.running_cap() is None
    planner = Planner(PlannerConfig(block_size=16), policy)
    planner.rates = LINED
    admitted = {a.request_id for a in planner.plan(unit, 0.0).admit}
    assert admitted == {s.request_id for s in makes_it}


def test_a_unit_over_the_group_size_preempts_outside_the_group() -> None:
    # 12 decoding that will miss their deadlines whatever runs; 10 waiting that can make it.
    late = SloTargets(deadline_at=1.0)
    running = [
        seq(f"d{i}", 10, bound=800, targets=late, phase=Phase.DECODING, output=10)
        for i in range(12)
    ]
    waiting = [deadline_seq(f"w{i}", deadline_at=2.015) for i in range(10)]
    policy = JitServePolicy(group="measured")
    policy.rank(UnitView(1000, 1000, waiting=waiting, decoding=running), 0.0, 256, LINED)
    assert policy.running_cap() == 10
    victims = policy.preemptions()
    assert len(victims) == MAX_PREEMPTIONS
    assert set(victims) <= {s.request_id for s in running}


def test_the_step_line_is_fitted_from_reports_at_several_batch_sizes() -> None:
    model = StepModel()
    assert model.line() is None
    model.observe(16, 0.026)  # one batch size only: the prior, through it
    prior = model.line()
    assert prior is not None and prior.at(16) == pytest.approx(0.026)
    assert prior.fixed_s == pytest.approx(PRIOR_FIXED_SHARE * 0.026)
    for batch in (1, 8, 32, 64):
        model.observe(batch, LINE.at(batch))
    fitted = model.line()
    assert fitted is not None
    assert fitted.fixed_s == pytest.approx(LINE.fixed_s, rel=0.2)
    assert fitted.per_request_s == pytest.approx(LINE.per_request_s, rel=0.2)
    # Reports that slope down (noise) are not believed: the prior through the latest.
    falling = StepModel()
    for batch, step_s in ((4, 0.05), (40, 0.03)):
        falling.observe(batch, step_s)
    line = falling.line()
    assert line is not None and line.per_request_s > 0 and line.at(40) == pytest.approx(0.03)


def test_a_compound_members_deadline_counts_from_its_groups_first_arrival() -> None:
    from duetserve.proto.scheduling import Slo, SloKind
    from duetserve.services.scheduler.targets import slo_targets

    compound = Slo(SloKind.COMPOUND, deadline_ms=10_000.0, group="g", group_size=3)
    targets = slo_targets(compound, arrival=100.0, group_age_s=4.0)
    assert targets is not None and targets.deadline_at == pytest.approx(106.0)
    deadline = Slo(SloKind.DEADLINE, deadline_ms=10_000.0)
    plain = slo_targets(deadline, arrival=100.0, group_age_s=4.0)  # not a group: its own
    assert plain is not None and plain.deadline_at == pytest.approx(110.0)


def test_a_ranking_of_a_long_queue_is_spread_over_plans_and_chooses_as_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over RANK_SLICE requests, a ranking scores a slice a plan; the plan after the last
    slice chooses the same group a ranking in one plan would, and until then the last group
    holds (and admission goes on by it)."""
    from duetserve.services.scheduler.policy import jitserve

    monkeypatch.setattr(jitserve, "RANK_SLICE", 4)
    lengths = [40, 400, 60, 800, 20, 300, 90, 700, 50, 600]
    waiting = [seq(f"r{i}", bound=b, arrival=0.01 * i) for i, b in enumerate(lengths)]
    whole = JitServePolicy()
    monkeypatch.setattr(jitserve, "RANK_SLICE", 100)
    whole.rank(UnitView(1000, 1000, waiting=list(waiting)), 1.0, 3, RATES)
    monkeypatch.setattr(jitserve, "RANK_SLICE", 4)
    sliced = JitServePolicy()
    unit = UnitView(1000, 1000, waiting=list(waiting))
    sliced.rank(unit, 1.0, 3, RATES)  # 4 of 10 scored: no group yet
    assert sliced._group == frozenset() and sliced._round is not None
    assert [s.request_id for s in sliced.admission_order(unit.waiting, 1.0)][:1] == ["r4"]
    sliced.rank(unit, 1.0, 3, RATES)  # 8 of 10
    sliced.rank(unit, 1.0, 3, RATES)  # all scored
    assert sliced._group == frozenset()
    sliced.rank(unit, 1.0, 3, RATES)  # chosen, in a plan of its own
    assert sliced._round is None and sliced._group == whole._group
    assert sliced._scores == whole._scores
    order = [s.request_id for s in sliced.admission_order(unit.waiting, 1.5)]
    assert order == [s.request_id for s in whole.admission_order(unit.waiting, 1.5)]


def member(
    name: str,
    group: str,
    deadline_at: float,
    bound: int = 100,
    size: int | None = None,
    phase: Phase = Phase.WAITING,
) -> SeqState:
    s = seq(name, bound=bound, targets=SloTargets(deadline_at=deadline_at), phase=phase)
    s.group, s.group_size = group, size
    return s


def ranked_scores(unit: UnitView, now: float = 0.0) -> dict[str, float]:
    policy = JitServePolicy()
    policy.rank(unit, now, batch_size=64, rates=RATES)
    return {s.request_id: policy._score(s, now) for s in (*unit.waiting, *unit.decoding)}


def test_a_compound_group_waits_with_members_that_have_slack_and_runs_those_that_do_not() -> None:
    # Each member needs ~1.1 s (100 prompt + 100 out). Group "far" has 60 s to spare: its
    # waiting members are deferred below a plain deadline request that can make it; group
    # "near" (deadline 2 s) is urgent and ranks with its full shared priority.
    far = [member(f"far{i}", "t\x00far", deadline_at=60.0) for i in range(3)]
    near = [member(f"near{i}", "t\x00near", deadline_at=2.0) for i in range(3)]
    plain = seq("plain", targets=SloTargets(deadline_at=30.0))
    scores = ranked_scores(UnitView(1000, 1000, waiting=[*far, *near, plain]))
    assert max(scores[s.request_id] for s in far) < scores["plain"] / 100
    assert min(scores[s.request_id] for s in near) > scores["plain"] / 10
    # Members share one priority: the group's reward over all of its work left.
    assert len({scores[s.request_id] for s in near}) == 1
    assert scores["near0"] == pytest.approx(1.0 / (3 * time_left_s(near[0], RATES)))


def test_a_running_member_keeps_the_groups_priority_however_much_slack_it_has() -> None:
    running = member("run", "t\x00g", deadline_at=60.0, phase=Phase.DECODING)
    waiting = member("wait", "t\x00g", deadline_at=60.0)
    scores = ranked_scores(UnitView(1000, 1000, waiting=[waiting], decoding=[running]))
    assert scores["run"] == pytest.approx(scores["wait"] / 1e-3)


def test_calls_still_to_come_make_the_present_members_urgent() -> None:
    # The same slack as a group of one, but the caller said five calls: the four to come
    # follow this one, so its latest start is now.
    alone = member("alone", "t\x00a", deadline_at=6.0)
    first = member("first", "t\x00b", deadline_at=6.0, size=5)
    scores = ranked_scores(UnitView(1000, 1000, waiting=[alone, first]))
    assert scores["alone"] < scores["first"] / 10


def test_a_group_that_cannot_make_its_deadline_drops_as_one() -> None:
    # One member of "doomed" needs far more than the deadline allows: the group cannot earn
    # its reward, so its short member falls as low as its long one.
    short = member("short", "t\x00doomed", deadline_at=3.0, bound=10)
    hopeless = member("long", "t\x00doomed", deadline_at=3.0, bound=2000)
    other = seq("other", bound=100, targets=SloTargets(deadline_at=3.0))
    scores = ranked_scores(UnitView(1000, 1000, waiting=[short, hopeless, other]))
    assert scores["short"] < scores["other"] * 1e-6
    assert scores["long"] < scores["other"] * 1e-6


def test_groups_of_the_same_name_in_two_tenants_are_two_groups() -> None:
    from duetserve.proto.scheduling import Slo, SloKind
    from duetserve.services.scheduler.targets import compound_group

    slo = Slo(kind=SloKind.COMPOUND, group="g", deadline_ms=1000)
    assert compound_group(slo, "a") != compound_group(slo, "b")
    assert compound_group(Slo(kind=SloKind.DEADLINE, deadline_ms=1000), "a") == ""
