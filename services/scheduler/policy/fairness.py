"""Fairness across tenants by a Virtual Token Counter (Sheng et al., "Fairness in Serving Large
Language Models", OSDI'24), composed with any scheduling policy.

Each tenant has a counter of the service it has had: PROMPT_WEIGHT per prompt token when its
request gets blocks, OUTPUT_WEIGHT per output token as the decode worker reports them (every
roll call, ~2 s; a preempted request's recomputed tokens are not counted again). The weights
are the paper's (1 and 2): a decoded token costs a step's share, a prompt token a fraction of
that. A tenant that becomes backlogged (a request waiting where it had none) is lifted to the
least counter of the tenants active now (waiting or running), so idling earns no credit to
spend later in a burst.

How it composes with the SLO policy (`inner`): **fairness between tenants, the policy within
one.** The next request admitted is the inner policy's first of the backlogged tenant with the
least counter (each admission in one plan charges its prompt, so one plan interleaves tenants
as the counters say); a request waiting over STARVED_S still goes first. Memory preemption
takes the tenant with the most counter first, the inner policy's order within it. The inner
policy's own preemptions and running cap stand; on top, when a backlogged tenant is behind a
running one by more than FAIR_GAP and the unit is full (at its running cap, or with too few
free blocks for the waiting tenant's next prompt), one running request of the tenant furthest
ahead is preempted per RANK_INTERVAL_S, so a light tenant does not wait for a heavy one's long
answers to end.

For two tenants both backlogged, the service each gets over any interval differs by at most
about the work that can run at once plus one report's worth of output: the paper's bound
(2 x the most weighted tokens in flight) widened by the roll-call lag; the test states it.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from duetserve.services.scheduler.policy.base import Policy, Rates
from duetserve.services.scheduler.policy.jitserve import RANK_INTERVAL_S, STARVED_S
from duetserve.services.scheduler.state import Phase, SeqState, UnitView

PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0
# A backlogged tenant this far behind a running one (weighted tokens) preempts for fairness.
FAIR_GAP = 2048.0


@dataclass(slots=True)
class _Charged:
    seq: SeqState
    prompt: int = 0  # prompt tokens counted
    output: int = 0  # output tokens counted

    def charge(self) -> float:
        """Weighted tokens served since the last charge (a waiting request has had none, or
        has had them counted already: recompute after a preemption is not charged twice)."""
        seq = self.seq
        prompt = seq.prompt_len - seq.num_output  # the tenant's own prompt
        served = OUTPUT_WEIGHT * max(seq.num_output - self.output, 0)
        if seq.phase != Phase.WAITING:
            served += PROMPT_WEIGHT * max(prompt - self.prompt, 0)
            self.prompt = max(self.prompt, prompt)
        self.output = max(self.output, seq.num_output)
        return served


@dataclass(slots=True)
class FairPolicy:
    inner: Policy
    block_size: int = 16
    counters: dict[str, float] = field(default_factory=dict)
    _charged: dict[str, _Charged] = field(default_factory=dict)
    _backlogged: frozenset[str] = frozenset()
    _preempt: tuple[str, ...] = ()
    _next_fair_check: float = float("-inf")
    name: str = ""

    def __post_init__(self) -> None:
        self.name = f"{self.inner.name}+vtc"

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def rank(self, unit: UnitView, now: float, batch_size: int, rates: Rates | None) -> None:
        self._charge(unit)
        self._lift(unit)
        self.inner.rank(unit, now, batch_size, rates)
        if now >= self._next_fair_check:
            self._next_fair_check = now + RANK_INTERVAL_S
            self._preempt = self._fair_victims(unit, batch_size)

    def _charge(self, unit: UnitView) -> None:
        """Count what each request has had since the last look; one that has left the unit
        (finished: the scheduler sets its final output count) for the last time."""
        present: set[str] = set()
        for seq in (*unit.prefilling, *unit.decoding, *unit.waiting):
            present.add(seq.request_id)
            charged = self._charged.get(seq.request_id)
            if charged is None:
                charged = self._charged[seq.request_id] = _Charged(seq)
            charged.seq = seq
            self._add(seq.tenant, charged.charge())
        for gone in self._charged.keys() - present:
            charged = self._charged.pop(gone)
            self._add(charged.seq.tenant, charged.charge())

    def _add(self, tenant: str, served: float) -> None:
        if served:
            self.counters[tenant] = self.counter(tenant) + served

    def _lift(self, unit: UnitView) -> None:
        """A tenant newly backlogged starts at the least counter of those active now."""
        backlogged = frozenset(seq.tenant for seq in unit.waiting)
        active = backlogged | {seq.tenant for seq in (*unit.prefilling, *unit.decoding)}
        for tenant in backlogged - self._backlogged:
            others = [self.counter(t) for t in active if t != tenant]
            if others:
                self.counters[tenant] = max(self.counter(tenant), min(others))
        self._backlogged = backlogged

    def _fair_victims(self, unit: UnitView, batch_size: int) -> tuple[str, ...]:
        if not unit.waiting or not unit.decoding:
            return ()
        behind = min(unit.waiting, key=lambda s: (self.counter(s.tenant), s.arrival))
        running = len(unit.prefilling) + len(unit.decoding)
        cap = self.inner.running_cap()
        limit = batch_size if cap is None else min(cap, batch_size)
        needed = -(-behind.num_uncomputed // self.block_size)
        if running < limit and unit.free_blocks >= needed:
            return ()  # it can start without anyone giving way
        ahead = max(unit.decoding, key=lambda s: self.counter(s.tenant))
        if self.counter(ahead.tenant) - self.counter(behind.tenant) <= FAIR_GAP:
            return ()
        theirs = [s for s in unit.decoding if s.tenant == ahead.tenant]
        return (self.inner.preemption_order(theirs, 0.0)[0].request_id,)

    def preemptions(self) -> tuple[str, ...]:
        victims, self._preempt = (*self.inner.preemptions(), *self._preempt), ()
        return tuple(dict.fromkeys(victims))

    def running_cap(self) -> int | None:
        return self.inner.running_cap()

    def skip_when_blocked(self) -> bool:
        return self.inner.skip_when_blocked()

    def admission_order(self, waiting: Sequence[SeqState], now: float) -> list[SeqState]:
        ordered = list(self.inner.admission_order(waiting, now))
        starved = [s for s in ordered if s.arrival <= now - STARVED_S]
        queues: dict[str, list[SeqState]] = {}
        for seq in ordered:
            if seq.arrival > now - STARVED_S:
                queues.setdefault(seq.tenant, []).append(seq)
        counters = {tenant: self.counter(tenant) for tenant in queues}
        heads = dict.fromkeys(queues, 0)
        result = list(starved)
        while queues:
            tenant = min(queues, key=lambda t: (counters[t], t))
            seq = queues[tenant][heads[tenant]]
            result.append(seq)
            counters[tenant] += PROMPT_WEIGHT * seq.num_uncomputed
            heads[tenant] += 1
            if heads[tenant] == len(queues[tenant]):
                del queues[tenant]
        return result

    def preemption_order(self, decoding: Sequence[SeqState], now: float) -> list[SeqState]:
        inner = self.inner.preemption_order(decoding, now)
        rank = {seq.request_id: i for i, seq in enumerate(inner)}
        return sorted(inner, key=lambda s: (-self.counter(s.tenant), rank[s.request_id]))
