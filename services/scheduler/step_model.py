"""The decode step's time against the batch size, as the unit has measured it.

A decode step reads every weight once whatever the batch (a fixed cost) and does work per
request on top (attention over its context, its rows of every matmul, sampling), so over the
batch sizes a unit runs at its step time is close to a line:

    step_s(batch) = fixed_s + per_request_s x batch

(the runtime benchmark's bfloat16 SmolLM2 steps, 6.3 / 14.3 / 24.7 / 40.6 ms at batch 1 / 8
/ 32 / 64, are within 2.3 ms of 7.9 ms + 0.52 ms a request). The line is fitted by least
squares to the decode worker's last WINDOW roll-call reports, each a mean step time over its
last steps in a row and the mean batch of those steps (WorkerEvents.step_batch). Until the
reports span MIN_SPREAD requests of batch, the slope is not known from them and the line
goes through the latest report with PRIOR_FIXED_SHARE of that step taken as fixed cost (the
share at batch 16 on the line above). A fitted slope or intercept below zero (noise: two
reports at nearly one batch size) is not trusted either, and the prior is used.

Policies use it to project what a batch of a given size would do to every request in it
(JITServe's group size: policy/jitserve.py).
"""

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

WINDOW = 32  # roll-call reports (~2 s apart: about a minute of decoding)
MIN_SPREAD = 4.0  # batch sizes the reports must span before their slope is believed
PRIOR_FIXED_SHARE = 0.5


class StepLine(NamedTuple):
    fixed_s: float
    per_request_s: float

    def at(self, batch: float) -> float:
        return self.fixed_s + self.per_request_s * max(batch, 1.0)


@dataclass(slots=True)
class StepModel:
    reports: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def observe(self, batch: float, step_s: float) -> None:
        """One report: `step_s` per step at a mean batch of `batch` requests."""
        if batch > 0 and step_s > 0:
            self.reports.append((batch, step_s))

    def line(self) -> StepLine | None:
        """The fitted line, or the prior through the latest report; None before any."""
        if not self.reports:
            return None
        batches = [b for b, _ in self.reports]
        if max(batches) - min(batches) >= MIN_SPREAD:
            fitted = _least_squares(list(self.reports))
            if fitted is not None:
                return fitted
        batch, step_s = self.reports[-1]
        fixed = PRIOR_FIXED_SHARE * step_s
        return StepLine(fixed, (step_s - fixed) / max(batch, 1.0))


def _least_squares(points: list[tuple[float, float]]) -> StepLine | None:
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var <= 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    intercept = mean_y - slope * mean_x
    if slope <= 0 or intercept < 0:
        return None
    return StepLine(intercept, slope)
