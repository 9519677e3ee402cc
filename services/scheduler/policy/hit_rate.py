"""Scheduling by cache hit rate (KVShare), composed with any scheduling policy.

A waiting request whose prompt the cache holds more of (an exact prefix, spans of similar
prompts) costs less to prefill, and its cached blocks are reused only while they stay cached:
admitting it sooner turns more of the cache into saved work before eviction takes it. So,
among the first WINDOW requests of the inner policy's admission order, those that can still
wait go by their expected hit rate (`SeqState.expected_hit`, the share of the prompt the cache
index said it held when the request arrived), highest first, the inner order breaking ties;
those that cannot wait any longer keep the inner policy's order, ahead of them.

"Can wait" is what the SLO allows: less than SLACK of its first-token budget spent (a latency
SLO's TTFT, a deadline's whole span) and not waiting past STARVED_S. A request with no target
can always wait, bar starvation. Only admission order changes: what runs, what is preempted and
the running cap are the inner policy's.
"""

from collections.abc import Iterator, Sequence
from itertools import islice

from duetserve.services.scheduler.policy.base import Policy, Rates
from duetserve.services.scheduler.policy.jitserve import STARVED_S
from duetserve.services.scheduler.state import SeqState, UnitView

WINDOW = 16  # of the inner order, reordered by hit rate
SLACK = 0.5  # share of its first-token budget a request may spend waiting for a better hit


def can_wait(seq: SeqState, now: float) -> bool:
    waited = now - seq.arrival
    if waited >= STARVED_S:
        return False
    targets = seq.targets
    if targets is None:
        return True
    if targets.ttft_s is not None and waited >= SLACK * targets.ttft_s:
        return False
    return not (
        targets.deadline_at is not None and waited >= SLACK * (targets.deadline_at - seq.arrival)
    )


class HitRatePolicy:
    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = f"{inner.name}+hit-rate"

    def rank(self, unit: UnitView, now: float, batch_size: int, rates: Rates | None) -> None:
        self.inner.rank(unit, now, batch_size, rates)

    def admission_order(self, waiting: Sequence[SeqState], now: float) -> Iterator[SeqState]:
        order = iter(self.inner.admission_order(waiting, now))
        head = list(islice(order, WINDOW))
        urgent = [s for s in head if not can_wait(s, now)]
        relaxed = [s for s in head if can_wait(s, now)]
        relaxed.sort(key=lambda s: -s.expected_hit)  # stable: the inner order breaks ties
        yield from urgent
        yield from relaxed
        yield from order

    def skip_when_blocked(self) -> bool:
        return self.inner.skip_when_blocked()

    def preemption_order(self, decoding: Sequence[SeqState], now: float) -> list[SeqState]:
        return self.inner.preemption_order(decoding, now)

    def preemptions(self) -> tuple[str, ...]:
        return self.inner.preemptions()

    def running_cap(self) -> int | None:
        return self.inner.running_cap()
