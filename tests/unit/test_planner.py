"""The scheduler's pure planning core: admission, chunked prefill, preemption, no stalls."""

import math
import random

import pytest

from duetserve.proto.workers import ResidentSize
from duetserve.services.scheduler.core import SpanReuse
from duetserve.services.scheduler.planner import Planner, PlannerConfig
from duetserve.services.scheduler.policy.fcfs import FcfsPolicy
from duetserve.services.scheduler.state import Phase, SeqState, UnitView, grow


def planner(**overrides: int | str) -> Planner:
    return Planner(
        PlannerConfig(**{"block_size": 16, "prefill_order": "arrival", **overrides}), FcfsPolicy()
    )


def seq(rid: str, arrival: float, prompt_len: int, **kw: int) -> SeqState:
    return SeqState(rid, arrival, prompt_len, max_tokens=kw.pop("max_tokens", 16), **kw)


def test_admits_in_arrival_order_and_never_overtakes_a_blocked_head() -> None:
    unit = UnitView(
        free_blocks=10,
        total_blocks=100,
        waiting=[seq("late", 3.0, 16), seq("big", 1.0, 200), seq("early", 0.5, 32)],
    )
    plan = planner().plan(unit, now=4.0)
    assert [a.request_id for a in plan.admit] == ["early"]  # "big" (13 blocks) blocks "late"
    assert plan.admit[0].num_new_blocks == 2


def test_shortfall_is_what_the_blocked_head_lacks() -> None:
    """What the scheduler asks the prefix cache to give back when nothing can be admitted."""
    unit = UnitView(
        free_blocks=10,
        total_blocks=100,
        waiting=[seq("late", 3.0, 16), seq("big", 1.0, 200), seq("huge", 0.5, 2000)],
    )
    p = planner()
    assert p.shortfall(unit, now=4.0) == 13 - 10  # "huge" is rejected, not waiting for room
    unit.free_blocks = 13
    assert p.shortfall(unit, now=4.0) == 0
    unit.free_blocks = 0
    assert planner(max_running=1).shortfall(unit, now=4.0) == 13
    unit.decoding.append(seq("running", 0.0, 16))
    assert planner(max_running=1).shortfall(unit, now=4.0) == 0  # the running limit holds it


def test_cached_prefix_blocks_are_not_allocated_again() -> None:
    unit = UnitView(free_blocks=10, total_blocks=10, waiting=[seq("r", 0, 100, num_cached=64)])
    plan = planner().plan(unit, now=1.0)
    assert plan.admit[0].num_new_blocks == 7 - 4


def test_a_prompt_larger_than_the_pool_is_rejected_not_stuck() -> None:
    unit = UnitView(free_blocks=4, total_blocks=4, waiting=[seq("huge", 0, 65), seq("ok", 1, 10)])
    plan = planner().plan(unit, now=1.0)
    assert [r.request_id for r in plan.reject] == ["huge"]
    assert "needs 5 KV blocks; the unit has 4" in plan.reject[0].reason
    assert [a.request_id for a in plan.admit] == ["ok"]


def test_prefill_is_chunked_under_the_token_budget() -> None:
    running = seq("a", 0, 300, num_computed=100, phase=Phase.PREFILLING)
    unit = UnitView(
        free_blocks=100, total_blocks=100, prefilling=[running], waiting=[seq("b", 1, 500)]
    )
    plan = planner(max_prefill_tokens=256).plan(unit, now=2.0)
    assert [(c.request_id, c.start, c.num_tokens, c.is_last) for c in plan.prefill] == [
        ("a", 100, 200, True),
        ("b", 0, 56, False),
    ]
    plan = planner(max_prefill_tokens=256).plan(unit, now=2.0, decode_tokens=156)
    assert [(c.request_id, c.num_tokens, c.is_last) for c in plan.prefill] == [("a", 100, False)]


def test_a_prompt_reusing_spans_is_prefilled_whole_or_not_yet() -> None:
    # KVShare's prefill over placed spans cannot be split: the prompt's rest goes in one chunk,
    # past the budget when it goes first, and waits for a later batch when it would not fit.
    short = seq("short", 0, 100, phase=Phase.PREFILLING)
    whole = seq("whole", 1, 400, num_computed=64, phase=Phase.PREFILLING)
    whole.whole = True
    unit = UnitView(100, 100, prefilling=[short, whole])
    plan = planner(max_prefill_tokens=256).plan(unit, now=2.0)
    assert [(c.request_id, c.num_tokens, c.is_last) for c in plan.prefill] == [("short", 100, True)]
    unit = UnitView(100, 100, prefilling=[whole])
    plan = planner(max_prefill_tokens=256).plan(unit, now=2.0)
    assert [(c.request_id, c.start, c.num_tokens, c.is_last) for c in plan.prefill] == [
        ("whole", 64, 336, True)
    ]
    # What it computes is what counts: most of a reusing prompt runs through a few layers.
    whole.charge = 120
    other = seq("other", 2, 300, num_computed=40, phase=Phase.PREFILLING)
    other.whole, other.charge = True, 120
    unit = UnitView(100, 100, prefilling=[whole, other, seq("short", 3, 30)])
    plan = planner(max_prefill_tokens=256).plan(unit, now=2.0)
    assert [(c.request_id, c.num_tokens) for c in plan.prefill] == [
        ("whole", 336),
        ("other", 260),
        ("short", 16),
    ]


def test_shortest_first_puts_short_prompts_before_a_long_ones_chunks() -> None:
    long = seq("long", 0, 900, num_computed=256, phase=Phase.PREFILLING)
    unit = UnitView(100, 100, prefilling=[long], waiting=[seq("short", 1, 20), seq("mid", 2, 100)])
    plan = planner(max_prefill_tokens=256, prefill_order="shortest").plan(unit, now=1.5)
    assert [(c.request_id, c.start, c.num_tokens, c.is_last) for c in plan.prefill] == [
        ("short", 0, 20, True),
        ("mid", 0, 100, True),
        ("long", 256, 136, False),
    ]
    # In arrival order the long prompt's chunk takes the whole budget, and both wait a step.
    plan = planner(max_prefill_tokens=256).plan(unit, now=1.5)
    assert [c.request_id for c in plan.prefill] == ["long"]
    # Once it has waited past prefill_max_wait_s it goes first anyway: never starved.
    plan = planner(max_prefill_tokens=256, prefill_order="shortest").plan(unit, now=2.5)
    assert [c.request_id for c in plan.prefill] == ["long"]


def test_running_cap_limits_admission() -> None:
    decoding = [seq(f"d{i}", 0, 10, phase=Phase.DECODING) for i in range(3)]
    unit = UnitView(100, 100, waiting=[seq("w", 1, 10)], decoding=decoding)
    assert planner(max_running=3).plan(unit, 1.0).admit == ()
    assert len(planner(max_running=4).plan(unit, 1.0).admit) == 1
    measured = planner(max_running=4)
    measured.running_limit = 3  # what admission measured holds TPOT
    assert measured.plan(unit, 1.0).admit == ()
    measured.running_limit = 64  # never above the configured cap
    assert measured.max_running == 4


def test_preemption_takes_the_newest_first_and_may_take_the_requester() -> None:
    old = seq("old", 0, 64, num_blocks=4, phase=Phase.DECODING)
    mid = seq("mid", 1, 64, num_blocks=4, phase=Phase.DECODING)
    new = seq("new", 2, 64, num_blocks=4, phase=Phase.DECODING)
    unit = UnitView(free_blocks=0, total_blocks=12, decoding=[old, mid, new])
    p = planner()
    assert p.preempt(unit, old, 1, now=3.0).victims == ("new",)
    assert p.preempt(unit, old, 6, now=3.0).victims == ("new", "mid")
    assert p.preempt(unit, new, 1, now=3.0).victims == ("new",)  # the newest yields itself


def test_preemption_counts_what_decoding_requests_have_grown_to() -> None:
    """Handed over with 4 prompt blocks each, they grew to 8 on the decode worker. Counted as
    they were handed over, two victims would be taken for 6 blocks where one frees 8."""
    old = seq("old", 0, 64, num_blocks=4, num_output=1, phase=Phase.DECODING)
    new = seq("new", 1, 64, num_blocks=4, num_output=1, phase=Phase.DECODING)
    unit = UnitView(free_blocks=0, total_blocks=16, decoding=[old, new])
    p = planner()
    assert p.preempt(unit, old, 6, now=2.0).victims == ("new", "old")  # stale: 4 < 6
    grow(unit.decoding, (ResidentSize("old", 70, 8), ResidentSize("new", 70, 8)))
    assert (new.num_output, new.num_blocks) == (70, 8)
    assert p.preempt(unit, old, 6, now=2.0).victims == ("new",)


def test_a_lone_sequence_that_fits_an_empty_pool_yields_and_waits() -> None:
    """Nothing else decodes, but the blocks are elsewhere (the prefix cache, prefills): it
    steps back to be recomputed later rather than failing."""
    alone = seq("alone", 0, 60, num_blocks=4, num_output=4, phase=Phase.DECODING)
    result = planner().preempt(UnitView(0, 40, decoding=[alone]), alone, 1, now=1.0)
    assert result == (("alone",), ())


def test_a_lone_sequence_that_outgrew_the_pool_fails_with_a_reason() -> None:
    alone = seq("alone", 0, 60, num_blocks=4, num_output=4, phase=Phase.DECODING)
    result = planner().preempt(UnitView(0, 4, decoding=[alone]), alone, 1, now=1.0)
    assert result.victims == ()
    assert [f.request_id for f in result.fail] == ["alone"]
    assert "outgrew the KV pool of 4 blocks" in result.fail[0].reason


@pytest.mark.parametrize("order", ["arrival", "shortest"])
@pytest.mark.parametrize("seed", range(5))
def test_every_request_finishes_under_memory_pressure(seed: int, order: str) -> None:
    """Drive the planner like the service does, with a pool far too small for everyone at
    once: every request completes, preempted ones included, and no block is lost."""
    rng = random.Random(seed)
    p = planner(max_prefill_tokens=64, prefill_order=order)
    total = 24
    unit = UnitView(free_blocks=total, total_blocks=total)
    requests = [
        seq(f"r{i}", i * 0.1, rng.randint(1, 100), max_tokens=rng.randint(1, 120))
        for i in range(30)
    ]
    unit.waiting = list(requests)
    finished: set[str] = set()
    for step in range(20000):
        if len(finished) == len(requests):
            break
        _apply_plan(p, unit, now=step)
        _decode_step(p, unit, finished, now=step)
        held = sum(s.num_blocks for s in unit.prefilling + unit.decoding)
        assert held + unit.free_blocks == total
    assert len(finished) == len(requests)
    assert unit.free_blocks == total
    assert sum(r.num_preemptions for r in requests) > 0  # the pressure was real


def _apply_plan(p: Planner, unit: UnitView, now: float) -> None:
    plan = p.plan(unit, now)
    assert plan.reject == ()
    by_id = {s.request_id: s for s in unit.waiting + unit.prefilling}
    for admission in plan.admit:
        s = by_id[admission.request_id]
        unit.waiting.remove(s)
        s.phase, s.num_blocks = Phase.PREFILLING, admission.num_new_blocks
        unit.free_blocks -= admission.num_new_blocks
        unit.prefilling.append(s)
    for chunk in plan.prefill:
        s = by_id[chunk.request_id]
        assert chunk.start == s.num_computed
        s.num_computed += chunk.num_tokens
        if chunk.is_last:
            unit.prefilling.remove(s)
            s.phase, s.num_output = Phase.DECODING, s.num_output + 1
            unit.decoding.append(s)


def _decode_step(p: Planner, unit: UnitView, finished: set[str], now: float) -> None:
    for s in list(unit.decoding):
        if s not in unit.decoding:
            continue  # preempted earlier in this step
        # This step writes the KV of the newest token: the context becomes prompt + output.
        if p.blocks_for(s.prompt_len + s.num_output) > s.num_blocks:
            if unit.free_blocks == 0:
                result = p.preempt(unit, s, 1, now)
                assert result.fail == ()
                for victim in [v for v in unit.decoding if v.request_id in result.victims]:
                    _requeue(unit, victim)
                if s not in unit.decoding:
                    continue
            s.num_blocks += 1
            unit.free_blocks -= 1
        s.num_output += 1
        if s.num_output >= s.max_tokens:
            unit.decoding.remove(s)
            unit.free_blocks += s.num_blocks
            s.num_blocks = 0
            finished.add(s.request_id)


def _requeue(unit: UnitView, victim: SeqState) -> None:
    """Preempt by recompute: everything generated so far becomes prompt to compute again."""
    unit.decoding.remove(victim)
    unit.free_blocks += victim.num_blocks
    victim.prompt_len += victim.num_output - 1
    victim.max_tokens -= victim.num_output - 1
    victim.num_output, victim.num_computed, victim.num_blocks = 0, 0, 0
    victim.phase = Phase.WAITING
    victim.num_preemptions += 1
    unit.waiting.append(victim)


def test_chunks_after_admission_start_where_the_cached_prefix_ends() -> None:
    """`plan` chunks a new prompt from 0; once admission found 2,864 of its 2,874 tokens in
    the prefix cache, the batch must compute only the last 10 (a chunk from 0 would recompute
    the cached part and, for a prompt over the budget, overshoot it and never finish)."""
    p = planner(max_prefill_tokens=2048)
    long = seq("long", 0.0, 2874)
    unit = UnitView(free_blocks=1000, total_blocks=1000, waiting=[long])
    planned = p.plan(unit, 0.0)
    assert planned.prefill[0].start == 0 and planned.prefill[0].num_tokens == 2048
    unit.waiting.remove(long)  # what the scheduler does on admission, with the cache's answer
    long.phase, long.num_cached, long.num_computed = Phase.PREFILLING, 2864, 2864
    unit.prefilling.append(long)
    [chunk] = p.prefill_chunks(unit, now=1.0)
    assert (chunk.start, chunk.num_tokens, chunk.is_last) == (2864, 10, True)
    assert p.prefill_chunks(unit, 1.0, decode_tokens=2045) == (("long", 2864, 3, False),)


def test_a_reusing_prefill_is_charged_what_it_computes() -> None:
    reuse = SpanReuse(recompute=0.15, check_layer=1, num_layers=30)
    # 100 new tokens in full; 900 placed: all through 2 of 30 layers, 15% through the rest.
    assert reuse.charge(1000, 900) == 100 + math.ceil(900 * (0.15 + 0.85 * 2 / 30))
    assert SpanReuse(1.0, 1, 30).charge(1000, 900) == 1000
    assert SpanReuse(0.0, 29, 30).charge(1000, 900) == 1000
