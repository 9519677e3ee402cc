"""First come, first served: the baseline every other policy is measured against."""

from collections.abc import Sequence

from duetserve.services.scheduler.policy.base import Rates
from duetserve.services.scheduler.state import SeqState, UnitView


class FcfsPolicy:
    """Admit in arrival order without overtaking; preempt the newest first (recompute), so the
    oldest requests keep their progress and nothing waits forever behind newer work."""

    name = "fcfs"

    def rank(self, unit: UnitView, now: float, batch_size: int, rates: Rates | None) -> None:
        return None

    def admission_order(self, waiting: Sequence[SeqState], now: float) -> list[SeqState]:
        return sorted(waiting, key=lambda s: (s.arrival, s.request_id))

    def skip_when_blocked(self) -> bool:
        return False

    def preemption_order(self, decoding: Sequence[SeqState], now: float) -> list[SeqState]:
        return sorted(decoding, key=lambda s: (s.arrival, s.request_id), reverse=True)

    def preemptions(self) -> tuple[str, ...]:
        return ()  # only memory preempts

    def running_cap(self) -> int | None:
        return None
