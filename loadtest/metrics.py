"""What a run measured, per request and in summary, with vLLM's definitions of the latencies
and DESIGN.md's of SLO attainment.

Per request (milliseconds; failed requests have none):
- TTFT: first token − sent.
- E2E: done − sent (vLLM's "latency").
- TPOT: (E2E − TTFT) / (output tokens − 1), vLLM's; undefined for one-token answers, which are
  left out of TPOT statistics.
- ITL: the gaps between consecutive streamed token times (`token_times_s[0]` is the first
  token); every request's gaps are pooled for the statistics, as vLLM does.

A request "arrives" when it was sent (`sent_s`): that is when the server saw it, and what its
deadlines count from. `spec.arrival_s` is only the plan."""

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, Self

import numpy as np

from duetserve.loadtest.spec import RequestResult, SloSpec

_MS = 1000.0


def ttft_ms(result: RequestResult) -> float | None:
    if not result.ok or result.first_token_s is None:
        return None
    return (result.first_token_s - result.sent_s) * _MS


def e2e_ms(result: RequestResult) -> float | None:
    if not result.ok or result.done_s is None:
        return None
    return (result.done_s - result.sent_s) * _MS


def tpot_ms(result: RequestResult) -> float | None:
    """(E2E − TTFT) / (output tokens − 1); None for answers of one token or none."""
    ttft, e2e = ttft_ms(result), e2e_ms(result)
    if ttft is None or e2e is None or result.output_tokens < 2:
        return None
    return (e2e - ttft) / (result.output_tokens - 1)


def itls_ms(result: RequestResult) -> list[float]:
    """The gaps between consecutive streamed tokens (none for a failed request)."""
    if not result.ok:
        return []
    times = result.token_times_s
    return [(later - earlier) * _MS for earlier, later in itertools.pairwise(times)]


class _GroupSpan(NamedTuple):
    first_sent_s: float
    last_done_s: float | None  # None while any member failed or is unfinished


def _group_spans(results: Sequence[RequestResult]) -> dict[str, _GroupSpan]:
    spans: dict[str, _GroupSpan] = {}
    for result in results:
        slo = result.spec.slo
        if slo is None or slo.kind != "compound" or slo.group is None:
            continue
        done = result.done_s if result.ok else None
        span = spans.get(slo.group)
        if span is None:
            spans[slo.group] = _GroupSpan(result.sent_s, done)
            continue
        last = None if span.last_done_s is None or done is None else max(span.last_done_s, done)
        spans[slo.group] = _GroupSpan(min(span.first_sent_s, result.sent_s), last)
    return spans


def _within(value: float | None, limit: float | None) -> bool:
    """A target of None is no target; a measured None never meets a real one."""
    return limit is None or (value is not None and value <= limit)


def _meets(result: RequestResult, slo: SloSpec | None, spans: Mapping[str, _GroupSpan]) -> bool:
    if not result.ok:
        return False
    if slo is None:
        return True
    if slo.kind == "latency":
        tpot = tpot_ms(result) if result.output_tokens >= 2 else 0.0  # one token: trivially met
        return _within(ttft_ms(result), slo.ttft_ms) and _within(tpot, slo.tpot_ms)
    if slo.kind == "deadline":
        return _within(e2e_ms(result), slo.deadline_ms)
    span = spans.get(slo.group) if slo.group is not None else None
    if span is None or span.last_done_s is None:
        return False
    return _within((span.last_done_s - span.first_sent_s) * _MS, slo.deadline_ms)


def attained(
    result: RequestResult,
    all_results: Sequence[RequestResult],
    default_slo: SloSpec | None = None,
) -> bool:
    """Whether `result` met its SLO (its spec's, else `default_slo`; with neither, finishing
    is enough). Failed requests never attain. Latency: TTFT ≤ ttft_ms and TPOT ≤ tpot_ms (a
    one-token answer meets TPOT trivially; an absent target is met). Deadline: E2E ≤
    deadline_ms. Compound: the group's last member done − its first member sent ≤ deadline_ms,
    judged from `all_results` (the member's own deadline); when any member of the group failed,
    no member attains."""
    slo = result.spec.slo or default_slo
    spans = _group_spans(all_results) if slo is not None and slo.kind == "compound" else {}
    return _meets(result, slo, spans)


def attainment_flags(
    results: Sequence[RequestResult], default_slo: SloSpec | None = None
) -> list[bool]:
    """`attained` for every result, in order (the groups computed once)."""
    spans = _group_spans(results)
    return [_meets(r, r.spec.slo or default_slo, spans) for r in results]


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Statistics of one latency in milliseconds (percentiles by numpy's linear method)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Self | None:
        """None when there are no values."""
        if not values_ms:
            return None
        array = np.asarray(values_ms, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(array, [50, 90, 99]))
        return cls(len(values_ms), float(array.mean()), p50, p90, p99)


@dataclass(frozen=True, slots=True)
class Summary:
    """One run. Rates are per second of `duration_s` (the run's wall time, given by the caller).

    - `requests`: results given; `ok` finished without error; `failed` the rest; `not_forced`
      finished but the server ignored the forced length (ignore_eos/min_tokens).
    - `ttft`, `tpot`, `itl`, `e2e`: over the finished requests (TPOT over those with at least
      two output tokens), None where nothing was measured.
    - `request_throughput` = ok / duration; `output_throughput` = output tokens of finished
      requests / duration; `total_token_throughput` = their prompt (as the workload counted) +
      output tokens / duration.
    - `attained`: requests that met their SLO (`attained`); `slo_attainment` = attained /
      requests (0 for no requests; failures count against it).
    - `goodput` (DistServe): attained / duration, in requests per second.
    - `token_goodput` (JITServe): prompt + output tokens of the attained requests / duration.
    """

    requests: int
    ok: int
    failed: int
    not_forced: int
    attained: int
    duration_s: float
    ttft: Percentiles | None
    tpot: Percentiles | None
    itl: Percentiles | None
    e2e: Percentiles | None
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    slo_attainment: float
    goodput: float
    token_goodput: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Self:
        fields = dict(data)
        for name in ("ttft", "tpot", "itl", "e2e"):
            value = fields.get(name)
            fields[name] = Percentiles(**value) if isinstance(value, dict) else None
        return cls(**fields)  # type: ignore[arg-type]


def summarize(
    results: Sequence[RequestResult], duration_s: float, default_slo: SloSpec | None = None
) -> Summary:
    """The Summary of a run lasting `duration_s` seconds (definitions in Summary)."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    done = [r for r in results if r.ok]
    flags = attainment_flags(results, default_slo)
    good = [r for r, ok in zip(results, flags, strict=True) if ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.spec.prompt_tokens for r in done)
    return Summary(
        requests=len(results),
        ok=len(done),
        failed=len(results) - len(done),
        not_forced=sum(not r.forced_length for r in done),
        attained=len(good),
        duration_s=duration_s,
        ttft=Percentiles.of([v for r in done if (v := ttft_ms(r)) is not None]),
        tpot=Percentiles.of([v for r in done if (v := tpot_ms(r)) is not None]),
        itl=Percentiles.of([v for r in done for v in itls_ms(r)]),
        e2e=Percentiles.of([v for r in done if (v := e2e_ms(r)) is not None]),
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(prompt_tokens + output_tokens) / duration_s,
        slo_attainment=len(good) / len(results) if results else 0.0,
        goodput=len(good) / duration_s,
        token_goodput=sum(r.spec.prompt_tokens + r.output_tokens for r in good) / duration_s,
    )


def to_json(summary: Summary) -> dict[str, object]:
    """The summary as a JSON-ready dict (`Summary.from_json` reads it back)."""
    return summary.to_json()
