"""The live load generator against the real Duet stack: timings, forced lengths, concurrency
limits, errors, cut-offs, a sweep, and the command line end to end."""

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib.image
import pytest

from duetserve.loadtest import arrivals, cli, report, workloads
from duetserve.loadtest.client import CANCELLED, run_requests
from duetserve.loadtest.metrics import e2e_ms, summarize, ttft_ms
from duetserve.loadtest.spec import RequestResult, RequestSpec, SloSpec
from duetserve.loadtest.sweep import OpenLoad, Target, sweep_rates
from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.model_specs import TINY

SLO = SloSpec("latency", ttft_ms=5000, tpot_ms=1000)  # generous: a slow CI machine meets it


@pytest.fixture(scope="module")
def duet(model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(model_dirs.get(TINY), tmp_path_factory.mktemp("var"))
    yield running
    assert stop_stack(running) == 0


def fixed(
    n: int, prompt_tokens: int, output_tokens: int, times: Sequence[float]
) -> list[RequestSpec]:
    specs = workloads.fixed(n, prompt_tokens, output_tokens, seed=7)
    return workloads.with_slo(workloads.assign_arrivals(specs, times), SLO)


def most_in_flight(results: Sequence[RequestResult]) -> int:
    """The most requests between their send and their end at any send time."""
    ends = [r.done_s if r.done_s is not None else float("inf") for r in results]
    return max(
        sum(other.sent_s <= r.sent_s < end for other, end in zip(results, ends, strict=True))
        for r in results
    )


async def test_poisson_run_completes_with_sensible_timings(duet: Stack) -> None:
    specs = fixed(12, 32, 16, arrivals.poisson(6.0, 12, seed=3))
    results = await run_requests(duet.base_url, duet.model_dir.name, specs, progress=False)
    assert [r.spec.index for r in results] == list(range(12))
    for r in results:
        assert r.ok, r.error
        assert r.forced_length and r.output_tokens == 16
        assert r.sent_s >= r.spec.arrival_s - 1e-3  # never early; late only by the event loop
        assert r.first_token_s is not None and r.done_s is not None
        assert r.sent_s < r.first_token_s <= r.done_s
        assert r.token_times_s == sorted(r.token_times_s)
        assert r.token_times_s[0] == r.first_token_s and 1 <= len(r.token_times_s) <= 16
        ttft, e2e = ttft_ms(r), e2e_ms(r)
        assert ttft is not None and e2e is not None and 0 < ttft <= e2e
    duration = max(r.done_s for r in results if r.done_s is not None)
    summary = summarize(results, duration, SLO)
    assert summary.requests == summary.ok + summary.failed == 12
    assert summary.failed == summary.not_forced == 0
    assert 0 <= summary.attained <= summary.ok
    assert summary.ttft is not None and summary.tpot is not None and summary.e2e is not None
    assert 0 < summary.ttft.mean <= summary.e2e.mean and summary.tpot.mean > 0


async def test_concurrency_limit_holds_for_a_burst(duet: Stack) -> None:
    specs = fixed(8, 16, 12, arrivals.all_at_once(8))
    results = await run_requests(
        duet.base_url, duet.model_dir.name, specs, max_concurrency=2, progress=False
    )
    assert len(results) == 8 and all(r.ok for r in results)
    assert most_in_flight(results) == 2


async def test_a_wrong_model_fails_every_request_cleanly(duet: Stack) -> None:
    specs = fixed(3, 16, 8, [0.0, 0.05, 0.1])
    results = await run_requests(duet.base_url, "no-such-model", specs, progress=False)
    assert len(results) == 3
    for r in results:
        assert not r.ok and r.error is not None and r.error.startswith("HTTP 404:")
        assert "no-such-model" in r.error
    summary = summarize(results, 1.0, SLO)
    assert (summary.ok, summary.failed, summary.attained) == (0, 3, 0)


async def test_limits_stop_sending_and_cut_off_what_is_left(duet: Stack) -> None:
    """The third request arrives after the duration limit: never sent. The first two are far
    too long to finish within the drain timeout: cut off and recorded as such."""
    specs = fixed(3, 16, 1500, [0.0, 0.0, 5.0])
    results = await run_requests(
        duet.base_url,
        duet.model_dir.name,
        specs,
        duration_limit_s=0.5,
        drain_timeout_s=0.5,
        progress=False,
    )
    assert [r.spec.index for r in results] == [0, 1]
    assert all(r.error == CANCELLED and r.done_s is None for r in results)


async def test_sweep_gives_one_point_per_rate(duet: Stack) -> None:
    target = Target(duet.base_url, duet.model_dir.name, progress=False)

    def draw(seed: int) -> list[RequestSpec]:
        return workloads.with_slo(workloads.fixed(5, 16, 8, seed=seed), SLO)

    load = OpenLoad(draw, seed=1, default_slo=SLO, pause_s=0.2)
    sweep = await sweep_rates(target, load, [10.0, 5.0])
    assert [point.rate for point in sweep.curve.points] == [5.0, 10.0]
    assert all(point.summary.ok == 5 for point in sweep.curve.points)
    assert sorted(sweep.runs) == [5.0, 10.0]


def test_cli_run_writes_results_and_a_plot(duet: Stack, tmp_path: Path) -> None:
    out, plot = tmp_path / "run.json", tmp_path / "run.png"
    command = [
        *(sys.executable, "-m", "duetserve.loadtest", "run", "--base-url", duet.base_url),
        *("--workload", "fixed", "--prompt-tokens", "16", "--output-tokens", "8"),
        *("--num-requests", "6", "--arrival", "poisson", "--rate", "8", "--seed", "2"),
        *("--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000", "--label", "duet-test"),
        *("--out", str(out), "--plot", str(plot)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "duet-test" in done.stdout and "SLO attainment" in done.stdout
    run = report.read_run(out)
    assert (run.summary.requests, run.summary.ok, run.summary.not_forced) == (6, 6, 0)
    assert run.metadata["model"] == duet.model_dir.name
    assert all(row.output_tokens == 8 for row in run.requests)
    assert "api_key" not in json.dumps(run.metadata)
    assert matplotlib.image.imread(str(plot)).ndim == 3


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_cli_help_lists_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    shared = [
        *("--base-url", "--model", "--api-key", "--endpoint", "--workload", "--num-requests"),
        *("--prompt-tokens", "--output-tokens", "--arrival", "--burstiness", "--slo-ttft-ms"),
        *("--slo-tpot-ms", "--slo-deadline-ms", "--no-duet-slo", "--seed", "--duration-limit-s"),
        *("--label", "--out", "--plot"),
    ]
    own = {
        "run": ["--rate", "--concurrency", "--trace"],
        "sweep": ["--rates", "--target-attainment", "--min-rate", "--max-rate"],
    }
    for option in [*shared, *own[command]]:
        assert option in text, option
    for workload in ("sharegpt-like", "long-prompt", "math-like", "multi-turn", "fixed"):
        assert workload in text
