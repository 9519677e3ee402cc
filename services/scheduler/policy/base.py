"""What a scheduling policy decides; the planner does the arithmetic around it."""

from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

from duetserve.services.scheduler.state import SeqState, UnitView
from duetserve.services.scheduler.step_model import StepLine


class Rates(NamedTuple):
    """What the unit has been doing lately, for policies that project when requests finish."""

    step_s: float  # one decode step at the batch running now
    prefill_s_per_token: float
    # The step time against batch size (scheduler/step_model.py); None: not measured yet.
    line: StepLine | None = None


class Policy(Protocol):
    name: str

    def rank(self, unit: UnitView, now: float, batch_size: int, rates: Rates | None) -> None:
        """Look at every request of the unit before a plan (a policy may do so less often)."""
        ...

    def admission_order(self, waiting: Sequence[SeqState], now: float) -> Iterable[SeqState]:
        """Waiting requests in the order they should get blocks (may be produced lazily:
        the planner mostly reads only the first few)."""
        ...

    def skip_when_blocked(self) -> bool:
        """May a later request be admitted when an earlier one does not fit? FCFS says no:
        skipping starves large prompts."""
        ...

    def preemption_order(self, decoding: Sequence[SeqState], now: float) -> list[SeqState]:
        """Decoding requests in the order they give up their blocks when memory runs out."""
        ...

    def preemptions(self) -> tuple[str, ...]:
        """Decoding requests to preempt now to make room for better ones (recompute), as the
        last `rank` chose them; each is returned once."""
        ...

    def running_cap(self) -> int | None:
        """At most this many requests should run (hold blocks) now, as the last `rank` chose;
        None: no cap of the policy's own (the planner's running limit holds)."""
        ...
