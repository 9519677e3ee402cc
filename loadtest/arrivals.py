"""When requests arrive: seconds from the run's start, sorted, deterministic from a seed.

Closed-loop load (a fixed number of requests in flight) is not an arrival process: the client
holds it with its concurrency limit, over specs that all arrive at once (`all_at_once`).

Trace files
-----------
`from_trace` reads a recorded or hand-written trace, one request per record, as JSON Lines
(`.jsonl`, `.json`) or CSV with a header row (`.csv`):

    {"timestamp": 0.0,  "prompt_tokens": 812, "output_tokens": 64, "slo": "interactive"}
    {"timestamp": 0.35, "prompt_tokens": 120, "output_tokens": 300}

    timestamp,prompt_tokens,output_tokens,slo
    0.0,812,64,interactive
    0.35,120,300,

- `timestamp`: seconds as a number, or an ISO-8601 date and time; any origin (the trace is
  shifted so that its first arrival is at 0) and any order (records are sorted by it, ties
  keep the file's order).
- `prompt_tokens`, `output_tokens`: positive integers.
- `slo` (optional; empty or null for none): the name of an SLO class, which the workload maps
  to an `SloSpec` (`workloads.replay`).

Azure's public LLM inference traces read as they are: `TIMESTAMP`, `ContextTokens` and
`GeneratedTokens` are accepted for the three required columns. Blank lines and lines starting
with `#` are skipped in JSON Lines files."""

import csv
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

_ALIASES = {
    "timestamp": ("timestamp", "TIMESTAMP"),
    "prompt_tokens": ("prompt_tokens", "ContextTokens"),
    "output_tokens": ("output_tokens", "GeneratedTokens"),
    "slo": ("slo", "slo_class"),
}


def poisson(rate: float, n: int, seed: int) -> list[float]:
    """`n` arrivals of a Poisson process of `rate` requests per second (exponential gaps)."""
    return gamma(rate, 1.0, n, seed)


def gamma(rate: float, burstiness: float, n: int, seed: int) -> list[float]:
    """`n` arrivals with gamma-distributed gaps, as vLLM's benchmark draws them: shape =
    `burstiness`, scale = 1 / (rate × burstiness), so the mean gap is 1 / rate whatever the
    burstiness, and the squared coefficient of variation of the gaps is 1 / burstiness.
    Burstiness 1 is Poisson; under 1 is burstier, over 1 is steadier. The first request
    arrives after one gap, not at 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be positive, got {rate} and {burstiness}")
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return [float(t) for t in np.cumsum(gaps)]


def uniform(rate: float, n: int) -> list[float]:
    """`n` arrivals evenly spaced at `rate` per second, the first at 0."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    return [i / rate for i in range(n)]


def all_at_once(n: int) -> list[float]:
    """A burst: `n` arrivals at 0 (for closed-loop runs and burst tests)."""
    return [0.0] * n


class TraceEntry(NamedTuple):
    arrival_s: float  # from the trace's first arrival
    prompt_tokens: int
    output_tokens: int
    slo_class: str | None


def from_trace(path: str | Path) -> list[TraceEntry]:
    """The entries of a trace file (format in the module docstring), sorted by arrival."""
    path = Path(path)
    rows: list[tuple[int, Mapping[str, object]]]
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as file:
            rows = [(n + 2, row) for n, row in enumerate(csv.DictReader(file))]
    else:
        rows = list(_jsonl_rows(path))
    parsed = [_entry(row, f"{path}:{line}") for line, row in rows]
    if not parsed:
        return []
    parsed.sort(key=lambda entry: entry[0])
    start = parsed[0][0]
    return [TraceEntry(t - start, p, o, s) for t, p, o, s in parsed]


def _jsonl_rows(path: Path) -> Iterable[tuple[int, Mapping[str, object]]]:
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON: {error}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            yield number, row


def _field(row: Mapping[str, object], name: str) -> object:
    for alias in _ALIASES[name]:
        value = row.get(alias)
        if value is not None and value != "":
            return value
    return None


def _entry(row: Mapping[str, object], where: str) -> tuple[float, int, int, str | None]:
    timestamp = _field(row, "timestamp")
    if timestamp is None:
        raise ValueError(f"{where}: no timestamp")
    prompt = _positive_int(_field(row, "prompt_tokens"), "prompt_tokens", where)
    output = _positive_int(_field(row, "output_tokens"), "output_tokens", where)
    slo = _field(row, "slo")
    return _seconds(timestamp, where), prompt, output, None if slo is None else str(slo)


def _positive_int(value: object, name: str, where: str) -> int:
    try:
        number = float(str(value)) if value is not None else None
    except ValueError:
        number = None
    if number is None or not number.is_integer() or number < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(number)


def _seconds(value: object, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return _parse_datetime(text).timestamp()
    except ValueError:
        raise ValueError(f"{where}: timestamp {value!r} is neither seconds nor ISO-8601") from None


def _parse_datetime(text: str) -> datetime:
    """ISO-8601, with any number of fraction digits (Azure's traces have seven); a time
    without a zone is taken as UTC, so that daylight-saving changes never bend the gaps."""
    head, dot, fraction = text.partition(".")
    if dot:
        digits = "".join(c for c in fraction if c.isdigit())
        zone = fraction[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
