"""The live mode comparison's analysis: attainment at an SLO, the max rate at 90%, the best
static split, setups' settings, and a saved run's round trip into a report and a plot."""

import json
from pathlib import Path

import pytest

from duetserve.loadtest.modes_live import (
    MaxRate,
    ModesRun,
    Probe,
    Row,
    SetupRun,
    Slo,
    attainment,
    best_static,
    e2e_stats,
    max_rate,
    plot,
    report,
    setup_env,
)


def _row(ttft: float, tpot: float | None = 10.0, error: str | None = None) -> Row:
    if error is not None:
        return Row(100, 0, None, None, None, error)
    return Row(100, 20, ttft, tpot, ttft + 19 * (tpot or 0))


def _probe(rate: float, met: int, missed: int) -> Probe:
    return Probe(rate, 10.0, [_row(50)] * met + [_row(5000)] * missed)


def test_attainment_needs_both_latencies_and_counts_failures_against() -> None:
    slo = Slo(ttft_ms=100, tpot_ms=20)
    rows = [_row(50), _row(150), _row(50, tpot=30), _row(50, tpot=None), _row(0, error="boom")]
    assert attainment(rows, slo) == pytest.approx(2 / 5)
    assert attainment([], slo) == 0.0


def test_max_rate_interpolates_between_the_last_hold_and_the_first_miss() -> None:
    slo = Slo(ttft_ms=100, tpot_ms=20)
    probes = [_probe(4, 8, 2), _probe(1, 10, 0), _probe(2, 10, 0)]  # 100, 100, 80 %
    assert max_rate(probes, slo) == MaxRate(2 + (1.0 - 0.9) / (1.0 - 0.8) * 2)
    assert max_rate([_probe(1, 10, 0), _probe(2, 9, 1)], slo) == MaxRate(2, "≥")
    assert str(max_rate([_probe(1, 5, 5)], slo)) == "<1"


def test_best_static_split_is_the_one_with_the_highest_max_rate() -> None:
    run = ModesRun("mix", "small", 100.0, 10.0)
    run.setups = [
        SetupRun("unified", {}, [_probe(1, 10, 0), _probe(2, 10, 0)]),
        SetupRun("semi-pd:0.3", {}, [_probe(1, 10, 0), _probe(2, 5, 5)]),
        SetupRun("semi-pd:0.7", {}, [_probe(1, 10, 0), _probe(2, 8, 2)]),
        SetupRun("semi-pd:dynamic", {}, [_probe(1, 10, 0), _probe(2, 10, 0)]),
        SetupRun("semi-pd:dynamic@v2", {}, [_probe(1, 10, 0), _probe(2, 10, 0)]),
    ]
    best = best_static(run, Slo.times(run, 7.5))
    assert best is not None and best.name == "semi-pd:0.7"


def test_setup_names_give_the_launchers_settings() -> None:
    tight = Slo(1733.1, 83.1)
    assert setup_env("disagg", tight)["DUET_MODE"] == "disagg"
    dynamic = setup_env("semi-pd:dynamic", tight)
    assert dynamic["DUET_SPLIT_CONTROL"] == "slo" and dynamic["DUET_DEFAULT_TTFT_MS"] == "1733.1"
    assert setup_env("semi-pd:dynamic@v2", tight) == dynamic  # a second run of a setup
    static = setup_env("semi-pd:0.3", tight)
    assert (static["DUET_SPLIT_CONTROL"], static["DUET_PREFILL_SHARE"]) == ("static", "0.3")
    for bad in ("semi-pd:1.5", "colocated"):
        with pytest.raises(ValueError):
            setup_env(bad, tight)


def test_a_saved_run_reports_and_plots(tmp_path: Path) -> None:
    run = ModesRun("sharegpt-like", "small", 200.0, 10.0)
    run.setups = [
        SetupRun("unified", {"DUET_MODE": "unified"}, [_probe(1, 10, 0), _probe(2, 6, 4)]),
        SetupRun("semi-pd:0.5", {}, [_probe(1, 9, 1), _probe(2, 0, 10)]),
    ]
    again = ModesRun.from_json(json.loads(json.dumps(run.to_json())))
    assert again == run
    text = report(again)
    assert "| unified | 1.25 | 1.25 |" in text  # 100% at 1, 60% at 2 req/s
    assert "Best static split at the tight SLO: semi-pd:0.5." in text
    mean, p99 = e2e_stats(run.setups[0].probes[0].rows)
    assert mean == pytest.approx(50 + 190)
    assert p99 == pytest.approx(240)
    assert plot(again, tmp_path / "modes.png").stat().st_size > 10_000
