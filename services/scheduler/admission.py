"""Admission: a request the unit cannot start within its SLO is refused at once, with when to
come back, instead of queued to miss it (and to make every request behind it miss theirs).

At submit, when the request could start is estimated from what is ahead of it and what the
unit has been doing (pure arithmetic, no I/O):

- prefill: every prompt token still to compute ahead of it (prefilling requests, and the
  waiting requests its scheduling policy admits before it: all of them under FCFS, those of
  higher priority under JITServe), at the prefill throughput of the last PREFILL_WINDOW
  batches (seconds over tokens; the first batch, which warms the worker up, does not count);
- a place to run: with `limit` requests running already (or the policy's own cap, when it
  has one: JITServe's group size), the queue ahead of it has to drain first, one request per
  finish: the k-th place comes free when the k-th running request has decoded what it has
  left (its predicted output bound, refined as it decodes, or what its max_tokens leaves; at
  the decode worker's step time), or, before a step time is known, at the rate requests
  finished over FINISH_WINDOW_S.

The longer of the two, compared with the request's TTFT target (its SLO's, or its deadline),
decides. Only an SLO the request stated itself can refuse it: one that stated none runs on the
server's default SLO, which schedules it, but it is not refused for a start the server merely
expects to be late (a client that asked for no latency would rather wait than get a 429; a
burst of 32 such requests was half refused, though all were served within 2.4 s). The queue
bound refuses it all the same.

How many may run at once is itself measured (`limit`, which the planner obeys too), against
the TPOT targets of what runs, from two signals:

- the decode worker's mean step time, reported every roll call (~2 s): the inter-token time
  every running request sees now, averaged over the worker's last 64 steps in a row (about
  one answer's decode, the span a TPOT is averaged over, so that the prefill-heavy start of a
  burst does not read as slow decoding). The median of the last STEP_WINDOWS reports over the
  tightest TPOT target decides, so one window with a long prefill step in it says nothing;
- each finished request's TPOT. One late now and then (it decoded through long prefills) says
  nothing about the batch size either: only more than MISS_SHARE of the last TPOT_WINDOW
  late does, the share an SLO-attainment goal of 90% allows. A request counts only if it
  started decoding after the last cut: the ones before saw the batch the cut already shrank.

Either over its target cuts the limit to DECREASE_FACTOR of what runs now; steps well within
it (or a finish within it) while the limit is what holds requests back raise it by one. So
the unit settles at the concurrency that holds its SLOs. (Cutting by 20% on any one late
finish left new requests queued for seconds: at 3.75 req/s of ShareGPT on `small` that was
76% attainment, 97% without any limit.)

Beyond `max_waiting` queued requests everything is refused, whatever the estimate.
A refusal carries Retry-After: how much sooner the unit would have had to be, at least 1 s.
With nothing ahead, or nothing measured yet (a new unit), a request is let in: waiting could
not make it start sooner.
"""

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from duetserve.proto.scheduling import SubmitRequest
from duetserve.services.scheduler.state import SeqState, UnitView
from duetserve.services.scheduler.step_model import StepModel
from duetserve.services.scheduler.targets import ttft_target_s

DECREASE_GAP_S = 2.0  # the running limit drops at most this often
DECREASE_FACTOR = 0.9
STEP_WINDOWS = 3  # roll-call step times the running limit takes the median of
INCREASE_BELOW = 0.8  # steps under this share of the target (and the limit binds): one more
TPOT_WINDOW = 32  # finished requests the late share is taken over ...
MIN_TPOT_SAMPLES = 10  # ... once there are this many
MISS_SHARE = 0.1  # late finishes beyond this share of the window cut the limit
PREFILL_WINDOW = 32  # batches the prefill throughput is measured over
FINISH_WINDOW_S = 30.0  # finishes the finish rate is measured over
MIN_RETRY_AFTER_S = 1.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Refusal:
    message: str
    retry_after_s: float


class AdmissionControl:
    def __init__(
        self,
        max_waiting: int,
        max_running: int,
        factor: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        slo_aware: bool = True,
    ) -> None:
        """`factor`: a request is refused when its expected start exceeds factor x its TTFT
        target. Without `slo_aware` only the queue bound holds: no SLO refuses a request, and
        the running limit stays `max_running`."""
        self.max_waiting, self.max_running, self.factor = max_waiting, max_running, factor
        self.slo_aware = slo_aware
        self.clock = clock
        self.limit = max_running  # requests that may run at once now (see the docstring)
        self.step_s: float | None = None  # the decode worker's seconds per step, lately
        self.steps = StepModel()  # step time against batch size, for the policies
        self._last_decrease = -math.inf
        self._late: deque[bool] = deque(maxlen=TPOT_WINDOW)  # finishes since the last cut
        self._step_ratios: deque[float] = deque(maxlen=STEP_WINDOWS)  # step_s / target
        self._batches: deque[tuple[int, float]] = deque(maxlen=PREFILL_WINDOW)
        self._finishes: deque[float] = deque()
        self._warmed_up = False
        self.refused = 0

    def on_prefill_batch(self, tokens: int, seconds: float) -> None:
        if not self._warmed_up:
            self._warmed_up = True
            return
        if tokens > 0 and seconds > 0:
            self._batches.append((tokens, seconds))

    def on_finished(self) -> None:
        now = self.clock()
        self._finishes.append(now)
        self._forget_finishes(now)

    def on_tpot(
        self,
        tpot_s: float,
        target_s: float | None,
        running: int,
        decoding_since: float | None = None,
    ) -> None:
        """A request finished with `tpot_s` per output token (its target `target_s`) while
        `running` requests ran; it had decoded since `decoding_since` (this clock's time;
        None: unknown, counted as recent)."""
        if target_s is None or not self.slo_aware:
            return
        late = tpot_s > target_s
        if not late:
            self._grow(running)
        if decoding_since is not None and decoding_since < self._last_decrease:
            return  # it saw the batch before the last cut
        self._late.append(late)
        share = sum(self._late) / len(self._late)
        if len(self._late) >= MIN_TPOT_SAMPLES and share > MISS_SHARE:
            reason = f"{share:.0%} of the last {len(self._late)} finished requests missed TPOT"
            self._cut(running, reason)

    def on_step_time(
        self, step_s: float, target_s: float | None, running: int, batch: float | None = None
    ) -> None:
        """The decode worker's seconds per step lately, at a mean of `batch` requests a step
        (None: not reported), against the tightest TPOT target of what decodes (None: none
        has one): what late finishes would say, sooner."""
        self.step_s = step_s
        if batch is not None:
            self.steps.observe(batch, step_s)
        if target_s is None or not self.slo_aware:
            return
        self._step_ratios.append(step_s / target_s)
        ratio = statistics.median(self._step_ratios)
        if ratio < INCREASE_BELOW:
            self._grow(running)
        elif ratio > 1.0 and len(self._step_ratios) == STEP_WINDOWS:
            self._cut(running, f"decode steps take {ratio:.2f}x the tightest TPOT target")

    def _grow(self, running: int) -> None:
        if running >= self.limit - 1:  # the limit binds, and TPOT holds: allow one more
            self.limit = min(self.max_running, self.limit + 1)

    def _cut(self, running: int, reason: str) -> None:
        now = self.clock()
        if now - self._last_decrease < DECREASE_GAP_S:
            return
        self._last_decrease = now
        self._late.clear()
        self._step_ratios.clear()
        before = self.limit
        self.limit = max(1, min(self.limit, math.floor(DECREASE_FACTOR * running)))
        if self.limit < before:
            logger.info(
                "running limit %d -> %d (%d running): %s", before, self.limit, running, reason
            )

    @property
    def prefill_s_per_token(self) -> float | None:
        tokens = sum(t for t, _ in self._batches)
        return sum(s for _, s in self._batches) / tokens if tokens else None

    def finish_rate(self) -> float | None:
        """Requests finished per second lately (None: none finished in the window)."""
        now = self.clock()
        self._forget_finishes(now)
        if len(self._finishes) < 2:
            return None
        span = max(now - self._finishes[0], 1.0)
        return len(self._finishes) / span

    def expected_start_s(
        self,
        view: UnitView,
        ahead: Sequence[SeqState] | None = None,
        limit: int | None = None,
    ) -> float:
        """Seconds until a request submitted now could start prefilling, behind `ahead` (the
        waiting requests its policy admits before it; None: all of them) with at most `limit`
        running (None: the running limit)."""
        waiting = view.waiting if ahead is None else ahead
        limit = self.limit if limit is None else limit
        prefill = 0.0
        per_token = self.prefill_s_per_token
        if per_token is not None:
            ahead_tokens = sum(s.num_uncomputed for s in (*waiting, *view.prefilling))
            prefill = ahead_tokens * per_token
        room = 0.0
        running = [*view.prefilling, *view.decoding]
        behind = len(waiting) + 1 - max(limit - len(running), 0)
        if behind <= 0:
            return prefill
        rate = self.finish_rate()
        if self.step_s is not None and running:
            left = sorted(s.remaining_output for s in running)
            rounds, index = divmod(behind - 1, len(left))
            room = (rounds * left[-1] + left[index]) * self.step_s
        elif rate is not None:
            room = behind / rate
        return max(prefill, room)

    def check(
        self,
        submit: SubmitRequest,
        view: UnitView,
        ahead: Sequence[SeqState] | None = None,
        limit: int | None = None,
    ) -> Refusal | None:
        """None: let it in. A refusal: why, and when to come back. `ahead` and `limit` as
        for expected_start_s."""
        if len(view.waiting) >= self.max_waiting:
            self.refused += 1
            return Refusal(
                f"the server is overloaded: {len(view.waiting)} requests are queued already",
                MIN_RETRY_AFTER_S,
            )
        target = _ttft_target_s(submit) if self.slo_aware else None
        if target is None:
            return None
        expected = self.expected_start_s(view, ahead, limit)
        if expected <= self.factor * target:
            return None
        self.refused += 1
        return Refusal(
            f"the server is overloaded: the request would start in about {expected:.1f}s, "
            f"its first token is due in {target:.1f}s",
            max(expected - self.factor * target, MIN_RETRY_AFTER_S),
        )

    def _forget_finishes(self, now: float) -> None:
        while self._finishes and self._finishes[0] < now - FINISH_WINDOW_S:
            self._finishes.popleft()


def _ttft_target_s(submit: SubmitRequest) -> float | None:
    slo = submit.slo
    if slo is None or not slo.from_request:
        return None
    return ttft_target_s(slo)
