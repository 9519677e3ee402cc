"""Shortest predicted first: the baseline JITServe is measured against besides FCFS. The
request with the least work left runs first, by its predicted output bound refined as it
decodes (common/lengths.py), and its prompt's prefill; the most work left is preempted
first. Blind to SLOs. A request waiting over jitserve.STARVED_S goes first all the same."""

from collections.abc import Sequence
from dataclasses import dataclass

from duetserve.services.scheduler.policy.base import Rates
from duetserve.services.scheduler.policy.jitserve import DEFAULT_RATES, STARVED_S, time_left_s
from duetserve.services.scheduler.state import SeqState, UnitView


@dataclass(slots=True)
class ShortestPredictedFirstPolicy:
    name: str = "spf"
    rates: Rates = DEFAULT_RATES

    def rank(self, unit: UnitView, now: float, batch_size: int, rates: Rates | None) -> None:
        if rates is not None:
            self.rates = rates

    def admission_order(self, waiting: Sequence[SeqState], now: float) -> list[SeqState]:
        starved = now - STARVED_S

        def key(seq: SeqState) -> tuple[bool, float]:
            if seq.arrival <= starved:
                return (False, seq.arrival)
            return (True, time_left_s(seq, self.rates))

        return sorted(waiting, key=key)

    def skip_when_blocked(self) -> bool:
        return True

    def preemption_order(self, decoding: Sequence[SeqState], now: float) -> list[SeqState]:
        return sorted(decoding, key=lambda seq: -time_left_s(seq, self.rates))

    def preemptions(self) -> tuple[str, ...]:
        return ()  # only memory preempts

    def running_cap(self) -> int | None:
        return None
