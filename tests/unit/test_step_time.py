"""The decode worker's reported step time (unit_worker/stepper.py: mean_step_s) and what the
scheduler's running limit (scheduler/admission.py) makes of it, roll call by roll call.

The step patterns are those of the step logs of a 32 x (128, 64) burst on `small` in unified
mode: a 128-token prefill, a few single-sequence steps, two mixed steps of ~2,000 prompt tokens
(0.45-1.0 s each), then 64 decode steps at batch 32 (~17 ms each)."""

from collections import deque

import pytest

from duetserve.proto.workers import ROLL_CALL_S
from duetserve.services.scheduler.admission import AdmissionControl
from duetserve.services.unit_worker.stepper import (
    MIN_STEP_TIME_STEPS,
    STEP_TIME_STEPS,
    mean_step_s,
)

TPOT_TARGET_S = 0.1  # the server's default SLO
BURST_RAMP_S = [0.053, 0.014, 0.011, 0.016, 1.004, 0.028, 0.447, 0.024, 0.055]
BURST = BURST_RAMP_S + [0.017] * 64


def test_too_few_steps_in_a_row_say_nothing() -> None:
    assert mean_step_s([]) is None
    assert mean_step_s([float(i) for i in range(MIN_STEP_TIME_STEPS - 1)]) is None
    assert mean_step_s([0.5 * i for i in range(MIN_STEP_TIME_STEPS)]) == pytest.approx(0.5)


def test_mean_over_the_last_steps_only() -> None:
    slow = [1.0 * i for i in range(10)]  # ten steps of 1 s, then many of 10 ms
    ends = slow + [slow[-1] + 0.01 * (i + 1) for i in range(STEP_TIME_STEPS)]
    assert mean_step_s(ends) == pytest.approx(0.01)
    some = slow + [slow[-1] + 0.01 * (i + 1) for i in range(STEP_TIME_STEPS - 11)]
    # 63 steps, 62 intervals: nine of 1 s, the rest of 10 ms
    assert mean_step_s(some) == pytest.approx((9 * 1.0 + 53 * 0.01) / 62)


def roll_calls(
    step_times: list[list[float]], idle_s: float, phase_s: float
) -> list[tuple[float, float | None, int]]:
    """(time, reported step_s, requests running) at each roll call, as the decode worker
    would report them while it runs `step_times` (a list of busy periods, `idle_s` apart; the
    worker's steps in a row restart after each idle gap) with roll calls every ROLL_CALL_S
    from `phase_s` on."""
    events: list[tuple[float, str]] = []
    now = 0.0
    for period in step_times:
        for step in period:
            now += step
            events.append((now, "step"))
        events.append((now + 1e-6, "idle"))
        now += idle_s
    t = phase_s
    while t < now:
        events.append((t, "call"))
        t += ROLL_CALL_S
    ends: deque[float] = deque(maxlen=STEP_TIME_STEPS)
    reports = []
    for at, kind in sorted(events):
        if kind == "step":
            ends.append(at)
        elif kind == "idle":
            ends.clear()
        else:
            reports.append((at, mean_step_s(ends), 32))
    return reports


@pytest.mark.parametrize("phase_s", [0.05 * i for i in range(40)])
def test_back_to_back_bursts_keep_the_running_limit(phase_s: float) -> None:
    """Bursts 0.3 s apart, roll calls at any phase: the limit stays where it was. (Over a
    fixed 2 s window, the ramp's few long steps read as 1.2-2.7x the target at every other
    burst's first roll call, and the limit fell from 256 to 28 with 32 running: the next
    burst's 32nd request then waited for the other 31 to finish.)"""
    admission = AdmissionControl(max_waiting=1024, max_running=256)
    for _, step_s, running in roll_calls([BURST] * 12, idle_s=0.3, phase_s=phase_s):
        if step_s is not None:
            admission.on_step_time(step_s, TPOT_TARGET_S, running)
    assert admission.limit == 256


def test_slow_decoding_still_cuts_the_limit() -> None:
    """Steps over the target for a sustained stretch (a batch too large for the TPOT target)
    cut the limit: the average does not hide what lasts."""
    admission = AdmissionControl(max_waiting=1024, max_running=256)
    for _, step_s, running in roll_calls([BURST_RAMP_S + [0.15] * 200], idle_s=0.3, phase_s=0.0):
        if step_s is not None:
            admission.on_step_time(step_s, TPOT_TARGET_S, running)
    assert admission.limit < 32
