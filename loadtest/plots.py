"""Sweep plots: latency percentiles and SLO attainment against the request rate, one curve per
system or mode, all overlaid on one figure. Drawn with matplotlib's Agg canvas directly (no
pyplot, no global state, no display needed)."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from duetserve.loadtest.metrics import Percentiles, Summary

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"))
PERCENTILE_STYLES: tuple[tuple[str, Literal["-", "--"], str], ...] = (
    ("p50", "-", "p50"),
    ("p99", "--", "p99"),
)


@dataclass(frozen=True, slots=True)
class SweepPoint:
    rate: float  # requests per second offered
    summary: Summary
    errors: dict[str, int] = field(default_factory=dict)  # why requests failed: reason -> count

    def to_json(self) -> dict[str, object]:
        document: dict[str, object] = {"rate": self.rate, "summary": self.summary.to_json()}
        if self.errors:
            document["errors"] = dict(self.errors)
        return document

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Self:
        summary = data["summary"]
        if not isinstance(summary, Mapping):
            raise ValueError("a sweep point's summary must be an object")
        errors = data.get("errors", {})
        if not isinstance(errors, Mapping):
            raise ValueError("a sweep point's errors must be an object")
        counts = {str(reason): int(str(count)) for reason, count in errors.items()}
        return cls(float(str(data["rate"])), Summary.from_json(summary), counts)


@dataclass(frozen=True, slots=True)
class SweepCurve:
    """One system or mode measured at several rates."""

    label: str
    points: list[SweepPoint] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "points": [p.to_json() for p in self.points]}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Self:
        points = data.get("points")
        if not isinstance(points, list):
            raise ValueError("a sweep curve's points must be a list")
        return cls(str(data["label"]), [SweepPoint.from_json(p) for p in points])


def _latency(point: SweepPoint, metric: str, percentile: str) -> float:
    stats: Percentiles | None = getattr(point.summary, metric)
    return float("nan") if stats is None else float(getattr(stats, percentile))


def _latency_panel(axes: Axes, curves: Sequence[SweepCurve], metric: str, name: str) -> None:
    for number, curve in enumerate(curves):
        points = sorted(curve.points, key=lambda p: p.rate)
        rates = [p.rate for p in points]
        for percentile, style, _ in PERCENTILE_STYLES:
            values = [_latency(p, metric, percentile) for p in points]
            axes.plot(rates, values, linestyle=style, marker="o", markersize=3, color=f"C{number}")
    axes.set_title(f"{name} (ms)")
    axes.set_xlabel("request rate (req/s)")
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, ...
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.grid(True, which="both", alpha=0.3)


def _attainment_panel(axes: Axes, curves: Sequence[SweepCurve], target: float | None) -> None:
    for number, curve in enumerate(curves):
        points = sorted(curve.points, key=lambda p: p.rate)
        shares = [100.0 * p.summary.slo_attainment for p in points]
        axes.plot([p.rate for p in points], shares, marker="o", markersize=3, color=f"C{number}")
    if target is not None:
        axes.axhline(100.0 * target, color="grey", linestyle=":", label="target")
    axes.set_title("SLO attainment (%)")
    axes.set_xlabel("request rate (req/s)")
    axes.set_ylim(0, 102)
    axes.grid(True, alpha=0.3)


def _legend(figure: Figure, curves: Sequence[SweepCurve]) -> None:
    handles = [Line2D([], [], color=f"C{n}", label=c.label) for n, c in enumerate(curves)]
    handles += [
        Line2D([], [], color="black", linestyle=style, label=label)
        for _, style, label in PERCENTILE_STYLES
    ]
    figure.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False
    )


def plot_sweep(
    curves: Sequence[SweepCurve],
    path: str | Path,
    target: float | None = 0.9,
    title: str | None = None,
) -> Path:
    """One PNG: TTFT, TPOT and E2E (p50 solid, p99 dashed, log scale) and SLO attainment (with
    the `target` line) against the rate, a colour per curve. Returns the path written."""
    if not curves:
        raise ValueError("nothing to plot: no curves")
    figure = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, 2)
    panels = [grid[0][0], grid[0][1], grid[1][0]]
    for axes, (metric, name) in zip(panels, LATENCIES, strict=True):
        _latency_panel(axes, curves, metric, name)
    _attainment_panel(grid[1][1], curves, target)
    _legend(figure, curves)
    if title:
        figure.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=120)
    return out


def plot_way_percentiles(
    ways: Mapping[str, Mapping[str, Mapping[str, float]]],
    metrics: Sequence[str],
    title: str,
    path: Path,
) -> None:
    """Bars of p50 / p90 / p99 for each way a benchmark ran (recompute, swap, ...), one panel
    a latency metric (`ways[way][metric][percentile]`, in ms)."""
    figure = Figure(figsize=(4.2 * len(metrics), 3.6))
    FigureCanvasAgg(figure)
    percentiles = ("p50", "p90", "p99")
    width = 0.8 / max(len(ways), 1)
    for panel, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), panel + 1)
        for i, (way, values) in enumerate(ways.items()):
            heights = [values.get(metric, {}).get(p, 0.0) for p in percentiles]
            xs = [x + (i - (len(ways) - 1) / 2) * width for x in range(len(percentiles))]
            axes.bar(xs, heights, width=width, label=way)
        axes.set_xticks(range(len(percentiles)), percentiles)
        axes.set_title(metric.replace("_ms", "").replace("_", " ") + ", ms")
        axes.grid(axis="y", alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def way_plot_link(
    ways: Mapping[str, Any],
    metrics: Sequence[str],
    title: str,
    path: Path,
    write: Path | None,
) -> str:
    """`plot_way_percentiles` of a run's ways (dataclasses), and the markdown that shows it,
    its path relative to the document it is written into (`write`) or the working folder."""
    import os
    from dataclasses import asdict

    rows = {way: asdict(w) for way, w in ways.items()}
    plot_way_percentiles(rows, metrics, title, path)
    where = write.parent if write is not None else Path.cwd()
    return f"\n\n![latencies by way]({os.path.relpath(path, where)})"
