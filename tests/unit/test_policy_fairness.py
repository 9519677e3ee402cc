"""Fairness across tenants by virtual token counters (scheduler/policy/fairness.py), on
hand-built units and on a toy unit that serves two backlogged tenants step by step."""

from duetserve.services.scheduler.planner import Planner, PlannerConfig
from duetserve.services.scheduler.policy import make_policy
from duetserve.services.scheduler.policy.fairness import (
    FAIR_GAP,
    OUTPUT_WEIGHT,
    PROMPT_WEIGHT,
    FairPolicy,
)
from duetserve.services.scheduler.policy.fcfs import FcfsPolicy
from duetserve.services.scheduler.state import Phase, SeqState, UnitView

PROMPT, OUTPUT, RUNNING = 50, 30, 4


def request(name: str, tenant: str, arrival: float, prompt: int = PROMPT) -> SeqState:
    return SeqState(name, arrival, prompt, max_tokens=1000, tenant=tenant)


def serve(policy_name: str, fairness: str, heavy: int, light: int) -> list[tuple[float, float]]:
    """Serve `heavy` requests of tenant "heavy" (arriving first) and `light` of "light"
    (arriving right after), RUNNING at a time, each decoding OUTPUT tokens one a step.
    Returns each step's (weighted service of heavy, of light) while both are backlogged."""
    policy = make_policy(policy_name, fairness)
    planner = Planner(PlannerConfig(block_size=16, max_running=RUNNING), policy)
    unit = UnitView(free_blocks=10_000, total_blocks=10_000)
    unit.waiting += [request(f"h{i}", "heavy", i * 1e-3) for i in range(heavy)]
    unit.waiting += [request(f"l{i}", "light", 1.0 + i * 1e-3) for i in range(light)]
    served = {"heavy": 0.0, "light": 0.0}
    trace = []
    for step in range(10_000):
        now = 2.0 + step * 0.05
        plan = planner.plan(unit, now)
        for victim in policy.preemptions():  # recompute, as the scheduler does
            seq = next(s for s in unit.decoding if s.request_id == victim)
            unit.decoding.remove(seq)
            seq.prompt_len += seq.num_output
            seq.num_computed, seq.phase = 0, Phase.WAITING
            unit.waiting.append(seq)
        for admission in plan.admit:
            seq = next(s for s in unit.waiting if s.request_id == admission.request_id)
            unit.waiting.remove(seq)
            if seq.num_preemptions == 0 and seq.num_output == 0:
                served[seq.tenant] += PROMPT_WEIGHT * seq.prompt_len
            seq.num_computed, seq.phase = seq.prompt_len, Phase.DECODING
            unit.decoding.append(seq)
        for seq in list(unit.decoding):
            seq.num_output += 1
            served[seq.tenant] += OUTPUT_WEIGHT
            if seq.num_output >= OUTPUT:
                unit.decoding.remove(seq)
        backlogged = {s.tenant for s in unit.waiting}
        if backlogged == {"heavy", "light"}:
            trace.append((served["heavy"], served["light"]))
        if not unit.waiting and not unit.decoding:
            return trace
    raise AssertionError("the toy unit never drained")


def worst_gap(trace: list[tuple[float, float]]) -> float:
    """The largest difference in service the two tenants got over any interval of the trace."""
    diffs = [heavy - light for heavy, light in trace]
    return max(diffs) - min(diffs)


def test_two_backlogged_tenants_get_service_within_the_bound() -> None:
    # The bound: twice the weighted work that can be in flight at once (RUNNING requests of
    # PROMPT + OUTPUT tokens), the paper's 2 x max(wp x input + wq x batch tokens).
    bound = 2 * RUNNING * (PROMPT_WEIGHT * PROMPT + OUTPUT_WEIGHT * OUTPUT)
    fair = serve("fcfs", "vtc", heavy=60, light=30)
    assert len(fair) > 50  # both were backlogged for a while
    assert worst_gap(fair) <= bound
    # Without it, arrival order serves the heavy tenant's whole backlog first.
    unfair = serve("fcfs", "none", heavy=60, light=30)
    assert worst_gap(unfair) > 3 * bound


def test_admission_interleaves_tenants_by_their_counters() -> None:
    policy = FairPolicy(FcfsPolicy())
    policy.counters = {"a": 0.0, "b": 120.0}
    waiting = [request(f"a{i}", "a", i) for i in range(3)] + [request("b0", "b", 0.5)]
    # a0 and a1 bring a to 100, then a2 (100 < 120) brings it to 150, past b.
    order = [s.request_id for s in policy.admission_order(waiting, 10.0)]
    assert order == ["a0", "a1", "a2", "b0"]
    policy.counters = {"a": 0.0, "b": 60.0}
    order = [s.request_id for s in policy.admission_order(waiting, 10.0)]
    assert order == ["a0", "a1", "b0", "a2"]


def test_a_tenant_back_from_idle_is_lifted_to_the_least_active_counter() -> None:
    policy = FairPolicy(FcfsPolicy())
    policy.counters = {"busy": 5000.0, "other": 7000.0, "idle": 10.0}
    running = [request("r", "busy", 0.0), request("o", "other", 0.0)]
    for seq in running:
        seq.phase, seq.num_computed = Phase.DECODING, seq.prompt_len
    policy._charged = {}  # their prompts were charged before
    unit = UnitView(100, 100, waiting=[request("w", "idle", 1.0)], decoding=running)
    policy.rank(unit, 1.0, 8, None)
    # busy and other were charged their prompts now (50 each); idle starts at the least.
    assert policy.counter("idle") == policy.counter("busy") == 5000.0 + PROMPT
    # A tenant already ahead keeps its counter.
    policy.counters["ahead"] = 9000.0
    unit.waiting.append(request("x", "ahead", 1.0))
    policy.rank(unit, 1.1, 8, None)
    assert policy.counter("ahead") == 9000.0


def test_memory_preempts_the_tenant_furthest_ahead_first() -> None:
    policy = FairPolicy(FcfsPolicy())
    policy.counters = {"light": 10.0, "heavy": 900.0}
    decoding = [request("l-old", "light", 0.0), request("h-old", "heavy", 1.0)]
    decoding.append(request("h-new", "heavy", 2.0))
    order = [s.request_id for s in policy.preemption_order(decoding, 3.0)]
    assert order == ["h-new", "h-old", "l-old"]  # heavy first, FCFS's newest-first within


def test_a_full_unit_preempts_for_a_tenant_far_behind_once_a_ranking() -> None:
    # light has waited all along (backlogged: not lifted) while heavy's answers grew.
    policy = FairPolicy(FcfsPolicy(), _backlogged=frozenset({"light"}))
    policy.counters = {"light": 0.0, "heavy": FAIR_GAP + 1000}
    decoding = [request(f"h{i}", "heavy", float(i)) for i in range(RUNNING)]
    for seq in decoding:
        seq.phase, seq.num_computed = Phase.DECODING, seq.prompt_len
    unit = UnitView(100, 100, waiting=[request("l", "light", 9.0)], decoding=decoding)
    policy._charged = {s.request_id: _charged(s) for s in decoding}
    policy.rank(unit, 10.0, RUNNING, None)
    assert policy.preemptions() == (f"h{RUNNING - 1}",)  # heavy's newest
    policy.rank(unit, 10.1, RUNNING, None)
    assert policy.preemptions() == ()  # one a ranking
    # Room to start: nobody gives way.
    roomy = FairPolicy(FcfsPolicy(), _backlogged=frozenset({"light"}))
    roomy.counters = {"light": 0.0, "heavy": FAIR_GAP + 1000}
    roomy.rank(unit, 10.0, RUNNING + 1, None)
    assert roomy.preemptions() == ()
    # Newly backlogged, light is lifted to heavy's counter: no gap, nobody gives way.
    lifted = FairPolicy(FcfsPolicy(), counters={"light": 0.0, "heavy": FAIR_GAP + 1000})
    lifted.rank(unit, 10.0, RUNNING, None)
    assert lifted.preemptions() == ()


def _charged(seq: SeqState):  # type: ignore[no-untyped-def]
    from duetserve.services.scheduler.policy.fairness import _Charged

    return _Charged(seq, seq.prompt_len, seq.num_output)
