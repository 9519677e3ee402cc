"""Terminal tables, run and sweep files, and a smoke test of the sweep plot."""

from pathlib import Path

from duetserve.loadtest.metrics import summarize
from duetserve.loadtest.report import (
    Sweep,
    SweepCurve,
    SweepPoint,
    format_summary,
    format_table,
    make_run,
    plot_sweep,
    read_run,
    read_sweep,
    write_run,
    write_sweep,
)
from duetserve.loadtest.spec import RequestResult, RequestSpec, SloSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def results(slowdown: float) -> list[RequestResult]:
    slo = SloSpec("latency", ttft_ms=300, tpot_ms=100)
    out = []
    for i in range(6):
        sent = 0.5 * i
        times = [sent + slowdown * (0.1 + 0.05 * k) for k in range(5)]
        spec = RequestSpec(i, "hello", 12, 5, sent, slo)
        out.append(RequestResult(spec, sent, times[0], times[-1], times, output_tokens=5))
    out.append(RequestResult(RequestSpec(6, "x", 3, 5, 3.0), 3.0, error="HTTP 503"))
    return out


def test_tables_side_by_side() -> None:
    fast, slow = summarize(results(1.0), 4.0), summarize(results(4.0), 4.0)
    table = format_table({"semi-pd": fast, "unified": slow})
    lines = table.splitlines()
    assert lines[0].split() == ["semi-pd", "unified"]
    attainment = next(line for line in lines if line.startswith("SLO attainment"))
    assert attainment.split()[-2:] == ["85.7", "0.0"]  # 6 of 7 met; then none
    assert "TTFT p99 (ms)" in table
    assert "result" in format_summary(fast)


def test_run_file_round_trip(tmp_path: Path) -> None:
    run = make_run({"mode": "semi-pd", "rate": 2.0}, results(1.0), duration_s=4.0)
    path = write_run(tmp_path / "runs" / "one.json", run)
    again = read_run(path)
    assert again == run
    assert [r.attained for r in again.requests] == [True] * 6 + [False]
    assert summarize(again.results(), 4.0) == run.summary


def test_sweep_file_and_plot(tmp_path: Path) -> None:
    curves = [
        SweepCurve(
            mode, [SweepPoint(rate, summarize(results(rate * factor), 4.0)) for rate in (1, 2, 4)]
        )
        for mode, factor in (("semi-pd", 0.5), ("unified", 1.0))
    ]
    sweep = Sweep({"workload": "sharegpt_like"}, curves)
    assert read_sweep(write_sweep(tmp_path / "sweep.json", sweep)) == sweep
    png = plot_sweep(curves, tmp_path / "plots" / "sweep.png", target=0.9, title="smoke")
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_a_sweep_point_keeps_why_requests_failed(tmp_path: Path) -> None:
    from duetserve.loadtest.sweep import error_counts

    rows = results(2)
    rows[0].error = "cancelled: still running when the run's drain timeout ran out"
    rows[1].error = rows[0].error
    rows[2].error = "HTTP 503: draining"
    counts = error_counts(rows)
    assert counts == {rows[0].error: 2, "HTTP 503: draining": 1, "HTTP 503": 1}
    point = SweepPoint(2.0, summarize(rows, 4.0), counts)
    sweep = Sweep({}, [SweepCurve("duet", [point])])
    again = read_sweep(write_sweep(tmp_path / "sweep.json", sweep))
    assert again.curves[0].points[0].errors == counts
    clean = SweepPoint(1.0, summarize(results(1), 4.0))
    assert "errors" not in clean.to_json()
