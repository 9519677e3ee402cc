"""JITServe: the most requests that meet their SLO, with output lengths known only as bounds.

Every request's priority is the reward it brings per second of work it still needs:

    priority = reward x slo_factor / time_left_s
    reward = 1 (a request that meets its SLO counts once, whatever its length)
    time_left_s = prompt tokens left x prefill s/token + output tokens expected x step s

Output tokens expected come from the request's predicted bound, refined as it decodes
(common/lengths.py). JITServe's code rewards tokens instead (prompt + 8 x output tokens), for
token goodput; since reward and work then both grow with the tokens, priority hardly tells
requests apart by length. Counting requests, on the policy benchmark's workload in the
simulator (one H100 unit, 2,000 requests a rate at 200 / 400 / 600 req/s): request goodput
+6% / +7% / +6% over the token reward, token goodput +1% / +3% / +1% (more answers end in
time), so the reward is the request.

`slo_factor` is 1 while the request is projected to meet its SLO and (target / projected) **
MISS_POWER (100) once it is not: at 5% late its priority falls ~130x, at 10% ~38,000x, so
the unit stops spending on requests that will miss anyway and gives the time to those that
can still make it, which is what goodput counts. What is projected: for a latency SLO whose
first token is not out yet, TTFT as the time waited plus the prompt's prefill; TPOT as the
step time now (the same for every running request: it moves all latency requests alike);
for a deadline, the end as now plus time_left_s.

Every RANK_INTERVAL_S the policy ranks every request of the unit (waiting, prefilling,
decoding). The group's size is the unit's running limit (`group="limit"`, the default:
JITServe's code takes vLLM's batch size), or, with `group="measured"`, sized first
(`group_size`): every request added to a batch slows the step of all of them
(scheduler/step_model.py), so it takes the requests by priority, best first, and for each count
k projects who would still meet their SLO at the step time of a batch of k (a TPOT target is a
step time; a deadline allows its time left over the tokens it still expects); the size is the k
with the most reward that meets its SLO (the larger on a tie, so requests that cannot make it
anyway still run where they cost the others nothing). Then it keeps the best WINDOW_FACTOR x
that size by priority, sorts them by time left, and picks the contiguous window of that size
with the highest summed priority (the "group": requests of similar length, so a batch is not
held up by one long member). The group size caps how many run (hold blocks); waiting requests
of the group are admitted first. When the unit is at the cap, decoding requests outside the
group are preempted (recompute) to make room for waiting members of the group, at most
MAX_PREEMPTIONS a ranking, lowest priority first. Between rankings, waiting requests are
admitted by their priority at the last ranking (one that arrived since, at its first look); one
waiting over STARVED_S goes first, so every accepted request runs in the end (JITServe has no
such rule: its requests time out instead).

Compound requests (several calls sharing one deadline; `compound_scores`) count as one: the
group's reward is earned only if every member ends in time, so each member takes the group's
priority, REWARD x the worst member's slo_factor / the work the group still needs (its present
members' time left, plus as much again for each call `group_size` says is still to come, at the
members' mean). And a group gets just enough of its members running: a waiting member whose
latest start (the deadline less LATEST_START_SAFETY x its own time left and that of the calls
still to come, which follow it) is more than URGENT_S away is deferred, its priority cut by
DEFER, below every request that can still meet its SLO and above those that cannot; it is
looked at again at every ranking and runs at full priority once its slack runs short (or at
once, when the unit has room: a deferred request still fills spare capacity). Members already
running keep the group's priority: stopping them would waste what they have computed.
"""

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from duetserve.services.scheduler.policy.base import Rates
from duetserve.services.scheduler.state import Phase, SeqState, UnitView

REWARD = 1.0
MISS_POWER = 100.0
WINDOW_FACTOR = 2
# The group caps how many run only when its members meeting their SLOs bring this many times
# the reward of everyone running: a cap costs throughput the projection does not count.
CAP_GAIN = 1.2
RANK_INTERVAL_S = 0.5
RANK_SLICE = 128  # requests a plan scores of a ranking under way (`JitServePolicy.rank`)
MAX_PREEMPTIONS = 2
# A request waiting this long goes first whatever its priority: one whose SLO is out of reach
# ranks last for good, and under sustained overload would otherwise never run.
STARVED_S = 30.0
# Until the unit has measured itself (the first steps and batches): a small model on a CPU.
DEFAULT_RATES = Rates(step_s=0.05, prefill_s_per_token=0.0005)
_EPSILON_S = 1e-3
# Compound groups (`compound_scores`). URGENT_S: two rankings, so a deferred member is promoted
# a ranking before its slack would run out; the safety factor covers time-left projections
# made at today's step time, which a larger batch later slows.
URGENT_S = 2 * RANK_INTERVAL_S
LATEST_START_SAFETY = 1.5
DEFER = 1e-3
# A group is forgotten this long after its deadline (its members are all gone by then).
GROUP_MEMORY_S = 60.0


def time_left_s(seq: SeqState, rates: Rates) -> float:
    """Seconds of work it still needs: its prompt's prefill, then its expected output."""
    prefill = seq.num_uncomputed * rates.prefill_s_per_token
    return prefill + seq.remaining_output * rates.step_s


def slo_factor(seq: SeqState, now: float, rates: Rates) -> float:
    """1 while it is projected to meet its SLO; (target / projected) ** MISS_POWER when not."""
    prefill_s = seq.num_uncomputed * rates.prefill_s_per_token
    left_s = prefill_s + seq.remaining_output * rates.step_s
    return _slo_factor(seq, now, rates.step_s, prefill_s, left_s)


def _slo_factor(seq: SeqState, now: float, step_s: float, prefill_s: float, left_s: float) -> float:
    targets = seq.targets
    if targets is None:
        return 1.0
    worst = 1.0
    if targets.ttft_s is not None and seq.num_output == 0:
        worst = min(worst, targets.ttft_s / max(now - seq.arrival + prefill_s, _EPSILON_S))
    if targets.tpot_s is not None:
        worst = min(worst, targets.tpot_s / max(step_s, _EPSILON_S))
    if targets.deadline_at is not None:
        allowed = targets.deadline_at - seq.arrival
        worst = min(worst, allowed / max(now + left_s - seq.arrival, _EPSILON_S))
    return 1.0 if worst >= 1.0 else worst**MISS_POWER


def priority(seq: SeqState, now: float, rates: Rates) -> float:
    """Reward per second of work left, cut steeply when its SLO is out of reach (module doc).
    After a preemption its recomputed output counts as prompt too: it is work again."""
    return priority_and_time_left(seq, now, rates)[0]


def priority_and_time_left(seq: SeqState, now: float, rates: Rates) -> tuple[float, float]:
    """`priority` and `time_left_s` at once. (Ranking runs it for every request of the unit:
    each term is computed once.)"""
    out_left = seq.remaining_output
    prefill_s = (seq.prompt_len - seq.num_computed) * rates.prefill_s_per_token
    left_s = prefill_s + out_left * rates.step_s
    factor = _slo_factor(seq, now, rates.step_s, prefill_s, left_s)
    return REWARD * factor / max(left_s, _EPSILON_S), left_s


def max_step_s(seq: SeqState, now: float, rates: Rates) -> float:
    """The slowest decode step at which it still meets its SLO (-inf: at none, inf: any)."""
    targets = seq.targets
    if targets is None:
        return math.inf
    prefill_s = seq.num_uncomputed * rates.prefill_s_per_token
    limit = math.inf
    waited_s = now - seq.arrival
    if targets.ttft_s is not None and seq.num_output == 0 and waited_s + prefill_s > targets.ttft_s:
        return -math.inf
    if targets.tpot_s is not None:
        limit = targets.tpot_s
    if targets.deadline_at is not None:
        left_s = targets.deadline_at - now - prefill_s
        if left_s <= 0:
            return -math.inf
        limit = min(limit, left_s / max(seq.remaining_output, 1))
    return limit


def _first(pair: tuple[tuple[bool, float, float], SeqState]) -> tuple[bool, float, float]:
    return pair[0]


def _heap_in_order(
    heap: list[tuple[tuple[bool, float, float], int, SeqState]],
) -> Iterator[tuple[tuple[bool, float, float], SeqState]]:
    """A heap's entries smallest first, without changing it: O(log k) for the k-th (a
    frontier of the heap's nodes, by their entries)."""
    if not heap:
        return
    frontier = [(heap[0], 0)]
    while frontier:
        (key, _, seq), index = heapq.heappop(frontier)
        yield key, seq
        for child in (2 * index + 1, 2 * index + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child], child))


def _arrival(seq: SeqState) -> float:
    return seq.arrival


@dataclass(slots=True)
class _Group:
    deadline_at: float
    seen: set[str] = field(default_factory=set)  # members ever ranked, finished ones too


def compound_scores(
    everyone: Sequence[SeqState],
    scores: dict[str, float],
    lefts: dict[str, float],
    now: float,
    groups: dict[str, _Group],
) -> None:
    """Rescore the compound members of `everyone` in place (module doc): each takes its
    group's priority, and waiting members with slack to spare are deferred. `scores` and
    `lefts` hold each request's own priority and time left; `groups` remembers each group's
    members across rankings (to count the calls still to come)."""
    members: dict[str, list[SeqState]] = {}
    for seq in everyone:
        if seq.group and seq.targets is not None and seq.targets.deadline_at is not None:
            members.setdefault(seq.group, []).append(seq)
            group = groups.get(seq.group)
            if group is None:
                group = groups[seq.group] = _Group(seq.targets.deadline_at)
            group.seen.add(seq.request_id)
    for key, present in members.items():
        group = groups[key]
        own = [lefts[seq.request_id] for seq in present]
        # Each member's own slo_factor, back out of its priority (REWARD x factor / left).
        factor = min(
            scores[seq.request_id] * max(left, _EPSILON_S) / REWARD
            for seq, left in zip(present, own, strict=True)
        )
        size = max((seq.group_size or 0 for seq in present), default=0)
        to_come = max(size - len(group.seen), 0) * (sum(own) / len(own))
        shared = REWARD * min(factor, 1.0) / max(sum(own) + to_come, _EPSILON_S)
        for seq, left in zip(present, own, strict=True):
            latest_start = group.deadline_at - LATEST_START_SAFETY * (left + to_come)
            deferred = seq.phase == Phase.WAITING and latest_start - now > URGENT_S
            scores[seq.request_id] = shared * DEFER if deferred else shared
    for key in [k for k, g in groups.items() if now > g.deadline_at + GROUP_MEMORY_S]:
        del groups[key]


def reward(seq: SeqState) -> float:
    return REWARD


def group_size(
    candidates: Sequence[SeqState],
    now: float,
    ceiling: int,
    rates: Rates,
    scores: dict[str, float] | None = None,
) -> int:
    """How many should run at once (module doc): the count k of the best requests by
    priority whose members that meet their SLO at a batch of k bring the most reward, the
    larger k on a tie. `ceiling` when that is all of them, or no step line is measured yet."""
    count = min(len(candidates), ceiling)
    if rates.line is None or count == 0:
        return ceiling
    scores = scores if scores is not None else _scores(candidates, now, rates)
    ranked = sorted(candidates, key=lambda s: -scores[s.request_id])[:count]
    meeting: list[tuple[float, int, float]] = []  # (its slowest step, index, its reward)
    value = best_value = 0.0
    best = count
    for k, seq in enumerate(ranked, start=1):
        step_s = rates.line.at(k)
        slowest = max_step_s(seq, now, rates)
        if slowest >= step_s:
            worth = reward(seq)
            heapq.heappush(meeting, (slowest, k, worth))
            value += worth
        while meeting and meeting[0][0] < step_s:  # steps only slow as k grows: gone for good
            value -= heapq.heappop(meeting)[2]
        if value >= best_value:
            best_value, best = value, k
    # All of them, or not clearly better than all of them (the projection is rough, and a
    # held request's SLO may still be met after): no cap, so newcomers are admitted too.
    if best == count or best_value < CAP_GAIN * value:
        return ceiling
    return best


def _scores(candidates: Sequence[SeqState], now: float, rates: Rates) -> dict[str, float]:
    return {seq.request_id: priority(seq, now, rates) for seq in candidates}


def select_group(
    candidates: Sequence[SeqState],
    now: float,
    batch_size: int,
    rates: Rates,
    scores: dict[str, float] | None = None,
    lefts: dict[str, float] | None = None,
) -> list[SeqState]:
    """The best WINDOW_FACTOR x batch_size by priority, sorted by time left; of those, the
    contiguous batch_size with the highest summed priority. `scores` and `lefts`: the
    candidates' priorities and times left, when known already."""
    if len(candidates) <= batch_size:
        return list(candidates)  # all of them, whatever the order
    scores = scores if scores is not None else _scores(candidates, now, rates)
    scored = sorted(((scores[s.request_id], s) for s in candidates), key=lambda p: -p[0])
    lefts = lefts if lefts is not None else {s.request_id: time_left_s(s, rates) for _, s in scored}
    top = sorted(scored[: WINDOW_FACTOR * batch_size], key=lambda p: lefts[p[1].request_id])
    if len(top) <= batch_size:
        return [seq for _, seq in top]
    window = sum(score for score, _ in top[:batch_size])
    best, best_start = window, 0
    for start in range(1, len(top) - batch_size + 1):
        window += top[start + batch_size - 1][0] - top[start - 1][0]
        if window > best:
            best, best_start = window, start
    return [seq for _, seq in top[best_start : best_start + batch_size]]


@dataclass(slots=True)
class JitServePolicy:
    name: str = "jitserve"
    rates: Rates = DEFAULT_RATES
    _group: frozenset[str] = frozenset()
    _next_rank: float = float("-inf")
    _preempt: tuple[str, ...] = ()
    _cap: int | None = None
    _scores: dict[str, float] = field(default_factory=dict)  # priorities at the last ranking
    # The queue at the last ranking as a heap by admission order (not counting starvation)
    # of (key, tie-break, request), and its ids.
    _order: list[tuple[tuple[bool, float, float], int, SeqState]] = field(default_factory=list)
    _ordered: frozenset[str] = frozenset()
    _ranked_waiting: list[SeqState] | None = None  # the queue at a ranking, not ordered yet
    _ranked_at: float = 0.0
    # A ranking under way (`rank`): the requests it ranks, and those scored so far.
    _round: list[SeqState] | None = None
    _round_scores: dict[str, float] = field(default_factory=dict)
    _round_lefts: dict[str, float] = field(default_factory=dict)  # their times left
    _round_done: int = 0  # how many of them are scored
    # The group's size: "limit", the unit's running limit (as JITServe's code takes vLLM's
    # batch size); "measured", `group_size` over the measured step line.
    group: str = "limit"
    _compound: dict[str, _Group] = field(default_factory=dict)  # compound groups ranked

    def rank(self, unit: UnitView, now: float, batch_size: int, rates: Rates | None) -> None:
        """`batch_size`: the most that may run by the unit's own limits.

        A ranking scores every request of the unit, ~1 us each: with thousands queued (an
        overload) that is milliseconds, more than one plan should take. So a ranking of more
        than RANK_SLICE requests is spread over the plans that follow, RANK_SLICE scored in
        each (the queue as it was when the ranking began; what arrives meanwhile is scored
        at its first look), and the group is chosen in the plan after the last slice (and
        the queue put in order in the plan after that: `_build_order`). Until then the last
        ranking's group and order hold."""
        if rates is not None:
            self.rates = rates
        if self._round is None:
            if now < self._next_rank:
                return
            self._next_rank = now + RANK_INTERVAL_S
            self._round = [*unit.waiting, *unit.prefilling, *unit.decoding]
            self._round_scores, self._round_lefts, self._round_done = {}, {}, 0
        everyone, scores, lefts = self._round, self._round_scores, self._round_lefts
        done = self._round_done
        for seq in everyone[done : done + RANK_SLICE]:
            key = seq.request_id
            scores[key], lefts[key] = priority_and_time_left(seq, now, self.rates)
        self._round_done = min(done + RANK_SLICE, len(everyone))
        if done < len(everyone) and len(everyone) > RANK_SLICE:
            return  # a long ranking chooses in a plan of its own, after its last slice
        self._round = None
        compound_scores(everyone, scores, lefts, now, self._compound)
        self._scores = scores
        size = max(batch_size, 1)
        if self.group == "measured":
            size = max(group_size(everyone, now, size, self.rates, scores), 1)
        group = select_group(everyone, now, size, self.rates, scores, lefts)
        self._group = frozenset(seq.request_id for seq in group)
        self._cap = size if size < batch_size else None
        self._preempt = self._victims(unit, now, size)
        self._ranked_waiting, self._ranked_at = list(unit.waiting), now  # ordered when asked

    def running_cap(self) -> int | None:
        return self._cap

    def _victims(self, unit: UnitView, now: float, batch_size: int) -> tuple[str, ...]:
        """Decoding requests outside the group, for waiting members that find the unit full."""
        if len(unit.prefilling) + len(unit.decoding) < batch_size:
            return ()
        waiting_members = sum(seq.request_id in self._group for seq in unit.waiting)
        outside = [seq for seq in unit.decoding if seq.request_id not in self._group]
        outside.sort(key=lambda seq: self._score(seq, now))
        count = min(MAX_PREEMPTIONS, waiting_members, len(outside))
        return tuple(seq.request_id for seq in outside[:count])

    def preemptions(self) -> tuple[str, ...]:
        victims, self._preempt = self._preempt, ()
        return victims

    def admission_order(self, waiting: Sequence[SeqState], now: float) -> Iterator[SeqState]:
        """Starved requests first (oldest first), then members of the group, then the rest,
        each by priority at the last ranking. The planner asks before every plan and takes
        the first few (a unit under load has room for one or two at a time), while the queue
        may hold thousands: the queue as it was at the ranking stays sorted (`_order`), only
        what arrived since is sorted, and the two are merged as the planner reads them."""
        if self._ranked_waiting is not None and now > self._ranked_at:
            self._build_order()  # the first look since the ranking (see there)
        starved = now - STARVED_S
        present = {id(seq) for seq in waiting}
        new = sorted(
            (
                (self._key(seq, now), seq)
                for seq in waiting
                if seq.request_id not in self._ordered and seq.arrival > starved
            ),
            key=_first,
        )
        yield from sorted((seq for seq in waiting if seq.arrival <= starved), key=_arrival)
        old = (
            (key, seq)
            for key, seq in _heap_in_order(self._order)
            if id(seq) in present and seq.arrival > starved
        )
        for _, seq in heapq.merge(old, new, key=_first):
            yield seq

    def _build_order(self) -> None:
        """The queue as it was at the ranking, as a heap by admission order: built in linear
        time, read in order only as far as the planner reads (`_heap_in_order`). Built at
        the first plan after the ranking's (which admits by the order before it), so that no
        one decision pays for both (a decision's time is what the p99 target counts)."""
        waiting, now = self._ranked_waiting or [], self._ranked_at
        self._order = [(self._key(seq, now), i, seq) for i, seq in enumerate(waiting)]
        heapq.heapify(self._order)
        self._ordered = frozenset(seq.request_id for seq in waiting)
        self._ranked_waiting = None

    def _key(self, seq: SeqState, now: float) -> tuple[bool, float, float]:
        """Where it goes, not starved: members of the group first, then by priority."""
        return (seq.request_id not in self._group, -self._score(seq, now), seq.arrival)

    def _score(self, seq: SeqState, now: float) -> float:
        """Its priority at the last ranking, or at its first look if it came since."""
        score = self._scores.get(seq.request_id)
        if score is None:
            score = self._scores[seq.request_id] = priority(seq, now, self.rates)
        return score

    def skip_when_blocked(self) -> bool:
        return True  # a prompt too big for the room now must not hold back better work

    def preemption_order(self, decoding: Sequence[SeqState], now: float) -> list[SeqState]:
        return sorted(decoding, key=lambda seq: priority(seq, now, self.rates))
