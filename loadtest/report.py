"""Reading and writing results: terminal tables of summaries, run files (JSON) and sweep files,
and (re-exported from `plots`) the sweep figure.

A run file is one JSON object:

    {"format": "duet-loadtest-run", "version": 1,
     "metadata": {...},            # free-form: system, mode, workload, rate, seed, model ...
     "summary": {...},             # Summary.to_json()
     "requests": [{...}, ...]}     # one RequestRow per request, prompt text left out

A sweep file holds `{"format": "duet-loadtest-sweep", "version": 1, "metadata": {...},
"curves": [SweepCurve.to_json(), ...]}`."""

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from duetserve.loadtest.metrics import (
    Percentiles,
    Summary,
    attainment_flags,
    e2e_ms,
    summarize,
    tpot_ms,
    ttft_ms,
)
from duetserve.loadtest.plots import SweepCurve, SweepPoint, plot_sweep
from duetserve.loadtest.spec import RequestResult, RequestSpec, SloSpec

__all__ = [
    "RequestRow",
    "Run",
    "Sweep",
    "SweepCurve",
    "SweepPoint",
    "format_summary",
    "format_table",
    "make_run",
    "plot_sweep",
    "read_run",
    "read_sweep",
    "write_run",
    "write_sweep",
]
RUN_FORMAT, SWEEP_FORMAT, VERSION = "duet-loadtest-run", "duet-loadtest-sweep", 1


def _rate(value: float) -> str:
    return f"{value:.2f}"


Row = tuple[str, Callable[[Summary], str]]


def _latency_rows() -> list[Row]:
    rows: list[Row] = []
    for metric, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{label} {stat} (ms)", _latency_cell(metric, stat)))
    return rows


def _latency_cell(metric: str, stat: str) -> Callable[[Summary], str]:
    def cell(summary: Summary) -> str:
        stats: Percentiles | None = getattr(summary, metric)
        return "-" if stats is None else f"{getattr(stats, stat):.1f}"

    return cell


ROWS: list[Row] = [
    ("requests", lambda s: str(s.requests)),
    ("  finished", lambda s: str(s.ok)),
    ("  failed", lambda s: str(s.failed)),
    ("  length not forced", lambda s: str(s.not_forced)),
    ("duration (s)", lambda s: f"{s.duration_s:.1f}"),
    ("request throughput (req/s)", lambda s: _rate(s.request_throughput)),
    ("output throughput (tok/s)", lambda s: f"{s.output_throughput:.1f}"),
    ("total throughput (tok/s)", lambda s: f"{s.total_token_throughput:.1f}"),
    ("SLO attainment (%)", lambda s: f"{100 * s.slo_attainment:.1f}"),
    ("goodput (req/s)", lambda s: _rate(s.goodput)),
    ("token goodput (tok/s)", lambda s: f"{s.token_goodput:.1f}"),
    *_latency_rows(),
]


def format_table(columns: Mapping[str, Summary]) -> str:
    """Summaries side by side, one column per system or mode (the mapping's keys head them)."""
    header = ["", *columns]
    body = [[name, *(cell(s) for s in columns.values())] for name, cell in ROWS]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = []
    for number, row in enumerate([header, *body]):
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(summary: Summary, title: str = "result") -> str:
    """One summary as a two-column table."""
    return format_table({title: summary})


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One request of a run file: what was asked, what was measured (times in seconds from the
    run's start, latencies in ms) and whether it met its SLO. The prompt text is left out."""

    index: int
    arrival_s: float
    sent_s: float
    first_token_s: float | None
    done_s: float | None
    prompt_tokens: int
    output_tokens_asked: int
    output_tokens: int
    error: str | None
    forced_length: bool
    conversation: str | None
    slo: dict[str, object] | None
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None
    attained: bool
    token_times_s: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, result: RequestResult, attained: bool, token_times: bool = True) -> Self:
        spec = result.spec
        return cls(
            index=spec.index,
            arrival_s=spec.arrival_s,
            sent_s=result.sent_s,
            first_token_s=result.first_token_s,
            done_s=result.done_s,
            prompt_tokens=spec.prompt_tokens,
            output_tokens_asked=spec.output_tokens,
            output_tokens=result.output_tokens,
            error=result.error,
            forced_length=result.forced_length,
            conversation=spec.conversation,
            slo=spec.slo.to_request() if spec.slo else None,
            ttft_ms=ttft_ms(result),
            tpot_ms=tpot_ms(result),
            e2e_ms=e2e_ms(result),
            attained=attained,
            token_times_s=list(result.token_times_s) if token_times else [],
        )

    def to_result(self) -> RequestResult:
        """The measurement back as a RequestResult (with an empty prompt)."""
        slo = SloSpec(**self.slo) if self.slo else None  # type: ignore[arg-type]
        spec = RequestSpec(
            self.index, "", self.prompt_tokens, self.output_tokens_asked, self.arrival_s, slo,
            self.conversation,
        )  # fmt: skip
        return RequestResult(
            spec, self.sent_s, self.first_token_s, self.done_s, list(self.token_times_s),
            self.output_tokens, self.error, self.forced_length,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Run:
    metadata: dict[str, object]
    summary: Summary
    requests: list[RequestRow]

    def results(self) -> list[RequestResult]:
        return [row.to_result() for row in self.requests]


def make_run(
    metadata: Mapping[str, object],
    results: Sequence[RequestResult],
    duration_s: float,
    default_slo: SloSpec | None = None,
    token_times: bool = True,
) -> Run:
    """Summarize a run and keep its per-request rows (`token_times=False` drops the token
    timestamps, which are most of a long run's file)."""
    flags = attainment_flags(results, default_slo)
    rows = [RequestRow.of(r, ok, token_times) for r, ok in zip(results, flags, strict=True)]
    return Run(dict(metadata), summarize(results, duration_s, default_slo), rows)


def _write(path: str | Path, document: Mapping[str, object]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n")
    return out


def _read(path: str | Path, expected: str) -> dict[str, Any]:
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or document.get("format") != expected:
        raise ValueError(f"{path}: not a {expected} file")
    if document.get("version") != VERSION:
        raise ValueError(f"{path}: {expected} version {document.get('version')!r} is not {VERSION}")
    return document


def write_run(path: str | Path, run: Run) -> Path:
    return _write(
        path,
        {
            "format": RUN_FORMAT,
            "version": VERSION,
            "metadata": run.metadata,
            "summary": run.summary.to_json(),
            "requests": [asdict(row) for row in run.requests],
        },
    )


def read_run(path: str | Path) -> Run:
    document = _read(path, RUN_FORMAT)
    rows = [RequestRow(**row) for row in document["requests"]]
    return Run(dict(document["metadata"]), Summary.from_json(document["summary"]), rows)


@dataclass(frozen=True, slots=True)
class Sweep:
    metadata: dict[str, object]
    curves: list[SweepCurve]


def write_sweep(path: str | Path, sweep: Sweep) -> Path:
    return _write(
        path,
        {
            "format": SWEEP_FORMAT,
            "version": VERSION,
            "metadata": sweep.metadata,
            "curves": [curve.to_json() for curve in sweep.curves],
        },
    )


def read_sweep(path: str | Path) -> Sweep:
    document = _read(path, SWEEP_FORMAT)
    curves = [SweepCurve.from_json(curve) for curve in document["curves"]]
    return Sweep(dict(document["metadata"]), curves)
