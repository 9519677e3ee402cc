"""Arrival processes: their statistics, their determinism, and trace files."""

from pathlib import Path

import numpy as np
import pytest

from duetserve.loadtest.arrivals import (
    TraceEntry,
    all_at_once,
    from_trace,
    gamma,
    poisson,
    uniform,
)

N = 20_000


def gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.asarray([0.0, *times]))


def dispersion(values: np.ndarray) -> float:
    """Squared coefficient of variation: variance / mean²."""
    return float(values.var() / values.mean() ** 2)


def test_poisson_gaps_are_exponential() -> None:
    times = poisson(rate=5.0, n=N, seed=11)
    assert len(times) == N and times == sorted(times) and times[0] > 0
    assert gaps(times).mean() == pytest.approx(0.2, rel=0.03)
    assert dispersion(gaps(times)) == pytest.approx(1.0, abs=0.08)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_dispersion(burstiness: float) -> None:
    times = gamma(rate=2.0, burstiness=burstiness, n=N, seed=5)
    assert gaps(times).mean() == pytest.approx(0.5, rel=0.05)
    assert dispersion(gaps(times)) == pytest.approx(1.0 / burstiness, rel=0.1)


def test_gamma_of_one_is_poisson_and_seeds_decide() -> None:
    assert gamma(3.0, 1.0, 100, seed=7) == poisson(3.0, 100, seed=7)
    assert poisson(3.0, 100, seed=7) == poisson(3.0, 100, seed=7)
    assert poisson(3.0, 100, seed=7) != poisson(3.0, 100, seed=8)
    with pytest.raises(ValueError):
        gamma(0.0, 1.0, 10, seed=0)


def test_bursts_and_even_spacing() -> None:
    assert all_at_once(3) == [0.0, 0.0, 0.0]
    assert uniform(4.0, 3) == [0.0, 0.25, 0.5]


def test_jsonl_trace_is_sorted_and_shifted(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "# a comment\n"
        '{"timestamp": 12.5, "prompt_tokens": 100, "output_tokens": 20, "slo": "batch"}\n'
        "\n"
        '{"timestamp": 10.0, "prompt_tokens": 812, "output_tokens": 64, "slo": "chat"}\n'
        '{"timestamp": 11, "prompt_tokens": 5, "output_tokens": 1, "slo": null}\n'
    )
    assert from_trace(trace) == [
        TraceEntry(0.0, 812, 64, "chat"),
        TraceEntry(1.0, 5, 1, None),
        TraceEntry(2.5, 100, 20, "batch"),
    ]


def test_csv_trace_and_azure_columns(tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_text("timestamp,prompt_tokens,output_tokens,slo\n0.5,10,5,\n0.0,20,6,chat\n")
    assert from_trace(plain) == [TraceEntry(0.0, 20, 6, "chat"), TraceEntry(0.5, 10, 5, None)]
    azure = tmp_path / "azure.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    entries = from_trace(azure)
    assert [(e.prompt_tokens, e.output_tokens) for e in entries] == [(374, 44), (396, 109)]
    assert entries[1].arrival_s == pytest.approx(50.995169 - 46.68059)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt_tokens": 1, "output_tokens": 1}', "no timestamp"),
        ('{"timestamp": 0, "prompt_tokens": 0, "output_tokens": 1}', "prompt_tokens"),
        ('{"timestamp": 0, "prompt_tokens": 3, "output_tokens": 1.5}', "output_tokens"),
        ('{"timestamp": "soon", "prompt_tokens": 3, "output_tokens": 1}', "ISO-8601"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_trace_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "prompt_tokens": 1, "output_tokens": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as raised:
        from_trace(trace)
    assert "bad.jsonl:2" in str(raised.value)
