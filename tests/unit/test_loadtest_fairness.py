"""The fairness benchmark's bookkeeping (loadtest/fairness.py): service by window, weighted as
the virtual token counters weigh it, and each tenant's latencies."""

import pytest

from duetserve.loadtest.fairness import WINDOW_S, service_windows, tenant_run
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.services.scheduler.policy.fairness import OUTPUT_WEIGHT, PROMPT_WEIGHT


def result(prompt: int, times: list[float], error: str | None = None) -> RequestResult:
    spec = RequestSpec(0, "x", prompt, 10, 0.0)
    done = None if error else times[-1]
    first = times[0] if times else None
    return RequestResult(spec, 0.0, first, done, times, len(times), error)


def test_service_counts_the_prompt_at_the_first_token_and_each_output_as_it_streams() -> None:
    early = result(100, [1.0, 2.0, WINDOW_S + 1.0])
    late = result(40, [2 * WINDOW_S + 0.5])
    windows = service_windows([early, late], end_s=3 * WINDOW_S - 1)
    assert windows == [
        PROMPT_WEIGHT * 100 + 2 * OUTPUT_WEIGHT,
        OUTPUT_WEIGHT,
        PROMPT_WEIGHT * 40 + OUTPUT_WEIGHT,
    ]


def test_a_tenant_run_reports_latencies_of_answers_that_finished() -> None:
    ok = result(10, [0.5, 0.6, 0.7])
    failed = result(10, [], error="overloaded")
    run = tenant_run([ok, failed], end_s=1.0)
    assert run.requests == 2 and run.failed == 1
    assert run.ttft_ms["p99"] == pytest.approx(500.0)
    assert run.tpot_ms["p50"] == pytest.approx(100.0)
