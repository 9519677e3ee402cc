"""Per-request latencies, SLO attainment and run summaries, against numbers worked out by hand."""

import numpy as np
import pytest

from duetserve.loadtest.metrics import (
    Percentiles,
    Summary,
    attained,
    attainment_flags,
    e2e_ms,
    itls_ms,
    summarize,
    tpot_ms,
    ttft_ms,
)
from duetserve.loadtest.spec import RequestResult, RequestSpec, SloSpec


def result(
    sent: float,
    tokens: list[float],
    slo: SloSpec | None = None,
    prompt_tokens: int = 10,
    error: str | None = None,
    forced: bool = True,
) -> RequestResult:
    """A request sent at `sent` whose tokens came at `tokens` (the last one is done)."""
    spec = RequestSpec(0, "hi", prompt_tokens, len(tokens), sent, slo)
    return RequestResult(
        spec,
        sent_s=sent,
        first_token_s=tokens[0] if tokens else None,
        done_s=None if error else (tokens[-1] if tokens else sent),
        token_times_s=list(tokens),
        output_tokens=len(tokens),
        error=error,
        forced_length=forced,
    )


def test_latencies_of_one_request() -> None:
    r = result(1.0, [1.2, 1.4, 1.7, 2.0])
    assert ttft_ms(r) == pytest.approx(200.0)
    assert e2e_ms(r) == pytest.approx(1000.0)
    assert tpot_ms(r) == pytest.approx(800.0 / 3)  # (1000 − 200) / (4 − 1)
    assert itls_ms(r) == pytest.approx([200.0, 300.0, 300.0])


def test_one_token_has_no_tpot_and_failures_have_nothing() -> None:
    single = result(0.0, [0.5])
    assert tpot_ms(single) is None and itls_ms(single) == []
    failed = result(0.0, [0.1, 0.2], error="boom")
    assert (ttft_ms(failed), tpot_ms(failed), e2e_ms(failed), itls_ms(failed)) == (
        None,
        None,
        None,
        [],
    )


def test_latency_slo_needs_both_targets() -> None:
    # TTFT 200 ms, TPOT 266.7 ms
    def judged(slo: SloSpec) -> bool:
        r = result(1.0, [1.2, 1.4, 1.7, 2.0], slo)
        return attained(r, [r])

    assert judged(SloSpec("latency", ttft_ms=200, tpot_ms=267))
    assert not judged(SloSpec("latency", ttft_ms=199, tpot_ms=267))
    assert not judged(SloSpec("latency", ttft_ms=200, tpot_ms=266))
    assert judged(SloSpec("latency", ttft_ms=200))  # no TPOT target


def test_one_token_answer_meets_tpot_trivially() -> None:
    r = result(0.0, [0.1], SloSpec("latency", ttft_ms=100, tpot_ms=1))
    assert attained(r, [r])


def test_deadline_counts_from_sending() -> None:
    r = result(2.0, [2.5, 3.0], SloSpec("deadline", deadline_ms=1000))
    assert attained(r, [r])
    late = result(2.0, [2.5, 3.0], SloSpec("deadline", deadline_ms=999))
    assert not attained(late, [late])


def test_compound_group_judged_by_its_last_answer() -> None:
    def group(deadline_ms: float) -> list[RequestResult]:
        slo = SloSpec("compound", deadline_ms=deadline_ms, group="plan")
        # first member sent at 0, the last answer done at 5: the group took 5 s
        return [result(0.0, [0.5, 3.0], slo), result(1.0, [1.1, 5.0], slo)]

    assert attainment_flags(group(5000)) == [True, True]
    members = group(4999)
    assert [attained(r, members) for r in members] == [False, False]


def test_compound_group_fails_with_any_failed_member() -> None:
    slo = SloSpec("compound", deadline_ms=60_000, group="g")
    members = [result(0.0, [0.1, 0.2], slo), result(0.0, [0.1], slo, error="cut off")]
    assert attainment_flags(members) == [False, False]


def test_failures_never_attain_and_default_slo_applies() -> None:
    failed = result(0.0, [0.1], error="refused")
    assert not attained(failed, [failed])
    plain = result(0.0, [0.3, 0.4])
    assert attained(plain, [plain])  # no SLO at all: finishing is enough
    assert not attained(plain, [plain], SloSpec("latency", ttft_ms=250))
    assert attained(plain, [plain], SloSpec("latency", ttft_ms=300))


def test_summary_by_hand() -> None:
    latency = SloSpec("latency", ttft_ms=250, tpot_ms=500)
    results = [
        result(0.0, [0.2, 0.4, 0.6], latency, prompt_tokens=100),  # meets: TTFT 200, TPOT 200
        result(1.0, [1.5, 1.6], latency, prompt_tokens=50),  # TTFT 500: misses
        result(2.0, [2.1, 2.2, 2.3, 2.4], None, prompt_tokens=20, forced=False),  # default SLO
        result(3.0, [3.1], latency, prompt_tokens=7, error="boom"),
    ]
    default = SloSpec("deadline", deadline_ms=400)  # result 2: E2E 400 ms, meets
    s = summarize(results, duration_s=10.0, default_slo=default)
    assert (s.requests, s.ok, s.failed, s.not_forced, s.attained) == (4, 3, 1, 1, 2)
    assert s.request_throughput == pytest.approx(0.3)
    assert s.output_throughput == pytest.approx((3 + 2 + 4) / 10)
    assert s.total_token_throughput == pytest.approx((170 + 9) / 10)
    assert s.slo_attainment == pytest.approx(0.5)
    assert s.goodput == pytest.approx(0.2)
    assert s.token_goodput == pytest.approx((100 + 3 + 20 + 4) / 10)
    assert s.ttft is not None and s.ttft.count == 3
    assert s.ttft.mean == pytest.approx((200 + 500 + 100) / 3)
    assert s.tpot is not None and s.tpot.p50 == pytest.approx(100.0)  # 200, 100, 100
    assert s.itl is not None and s.itl.count == 2 + 1 + 3
    assert s.e2e is not None and s.e2e.p50 == pytest.approx(600.0)  # 600, 600, 400


def test_percentiles_match_numpy() -> None:
    values = list(np.random.default_rng(3).exponential(50.0, size=501))
    stats = Percentiles.of(values)
    assert stats is not None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    assert (stats.p50, stats.p90, stats.p99) == pytest.approx((p50, p90, p99))
    assert stats.mean == pytest.approx(float(np.mean(values)))
    assert Percentiles.of([]) is None


def test_empty_run_and_json_round_trip() -> None:
    empty = summarize([], duration_s=1.0)
    assert (empty.slo_attainment, empty.ttft, empty.goodput) == (0.0, None, 0.0)
    full = summarize([result(0.0, [0.1, 0.2])], duration_s=2.0)
    assert Summary.from_json(full.to_json()) == full
    with pytest.raises(ValueError):
        summarize([], duration_s=0.0)
