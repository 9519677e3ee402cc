"""What a scheduling policy decides; the planner does the arithmetic around it."""

from collections.abc import Sequence
from typing import Protocol

from duetserve.services.scheduler.state import SeqState


class Policy(Protocol):
    name: str

    def admission_order(self, waiting: Sequence[SeqState], now: float) -> list[SeqState]:
        """Waiting requests in the order they should get blocks."""
        ...

    def skip_when_blocked(self) -> bool:
        """May a later request be admitted when an earlier one does not fit? FCFS says no:
        skipping starves large prompts."""
        ...

    def preemption_order(self, decoding: Sequence[SeqState], now: float) -> list[SeqState]:
        """Decoding requests in the order they give up their blocks when memory runs out."""
        ...
