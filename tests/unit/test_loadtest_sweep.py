"""Rate sweeps without a server: what every probe sends. Each probe has prompts of its own (a
prefix cache cannot answer one from another), the same sweep sends the same requests, and the
command line builds its sweep with fresh prompts and the model's context."""

import itertools
import json
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from duetserve.loadtest import cli, sweep, workloads
from duetserve.loadtest.spec import RequestResult, RequestSpec
from duetserve.loadtest.sweep import Measured, OpenLoad, Target
from duetserve.runtime.generator import assets
from duetserve.runtime.generator.spec import PRESETS

TARGET = Target("http://127.0.0.1:1/v1", "model", progress=False)


def draw(seed: int) -> list[RequestSpec]:
    return workloads.sharegpt_like(6, seed)


def prompts(specs: Sequence[RequestSpec]) -> set[str]:
    return {str(spec.prompt) for spec in specs}


def assert_disjoint(probes: Sequence[Sequence[RequestSpec]]) -> None:
    for first, second in itertools.combinations(probes, 2):
        assert not prompts(first) & prompts(second)


class Server:
    """Stands in for `sweep.measure`: keeps what every probe sent, answers all of it at once."""

    def __init__(self) -> None:
        self.sent: list[list[RequestSpec]] = []

    async def __call__(
        self, target: Target, specs: Sequence[RequestSpec], max_concurrency: int | None = None
    ) -> Measured:
        self.sent.append(list(specs))
        results = [
            RequestResult(s, s.arrival_s, s.arrival_s + 0.01, s.arrival_s + 0.02, [], 4)
            for s in specs
        ]
        return Measured(results, 1.0)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Server:
    fake = Server()
    monkeypatch.setattr(sweep, "measure", fake)
    return fake


def test_every_probe_has_prompts_of_its_own() -> None:
    load = OpenLoad(draw, seed=3)
    probes = [load.at_rate(rate, number) for number, rate in enumerate((1.0, 2.0, 4.0))]
    assert_disjoint(probes)
    assert [s.prompt for s in probes[0]] == [s.prompt for s in draw(3)]  # as `run --seed 3`
    assert load.at_rate(2.0, 1) == probes[1]
    assert probes[0][-1].arrival_s > probes[2][-1].arrival_s  # arrivals still follow the rate
    same = replace(load, fresh_prompts=False)
    assert {frozenset(prompts(same.at_rate(rate, n))) for n, rate in enumerate((1, 2, 4))} == {
        frozenset(prompts(draw(3)))
    }


async def test_a_rate_list_sends_fresh_prompts_and_repeats_itself(server: Server) -> None:
    load = OpenLoad(draw, seed=1, pause_s=0.0)
    first = await sweep.sweep_rates(TARGET, load, [4.0, 1.0, 2.0])
    assert [point.rate for point in first.curve.points] == [1.0, 2.0, 4.0]
    assert len(server.sent) == 3
    assert_disjoint(server.sent)
    await sweep.sweep_rates(TARGET, load, [4.0, 1.0, 2.0])
    assert server.sent[3:] == server.sent[:3]


async def test_the_max_rate_search_sends_fresh_prompts_and_repeats_itself(
    server: Server,
) -> None:
    load = OpenLoad(draw, seed=2, pause_s=0.0)
    found = await sweep.sweep_to_attainment(TARGET, load, goal=0.9, lo=1.0, hi=8.0)
    assert found.max_rate is not None and found.max_rate.rate == 8.0
    assert len(server.sent) == 4  # 1, 2, 4, 8: every one held
    assert_disjoint(server.sent)
    await sweep.sweep_to_attainment(TARGET, load, goal=0.9, lo=1.0, hi=8.0)
    assert server.sent[4:] == server.sent[:4]


def small_model_dir(directory: Path) -> Path:
    """`small`'s tokenizer and config.json, without weights."""
    small = PRESETS["small"]
    shutil.copy(assets.tokenizer_json_path(small.vocab_size), directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text("{}")
    (directory / "config.json").write_text(json.dumps(small.hf_config(0, [1], 4)))
    return directory


def sweep_command(server: Server, *options: str) -> list[list[RequestSpec]]:
    """What `python -m duetserve.loadtest sweep` sends for these options, one list a probe."""
    server.sent.clear()
    common = ["sweep", "--model", "model", "--no-progress", "--pause-s", "0", "--rates", "1,2"]
    assert cli.main([*common, "--workload", "long-prompt", "--num-requests", "4", *options]) == 0
    return server.sent


def test_the_sweep_command_draws_per_probe_within_the_context(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep.json"
    model = small_model_dir(tmp_path)
    probes = sweep_command(server, "--tokenizer", str(model), "--out", str(out))
    assert len(probes) == 2
    assert_disjoint(probes)
    for spec in itertools.chain(*probes):  # small's context, read from its config.json
        assert spec.prompt_tokens + spec.output_tokens + workloads.CHAT_TEMPLATE_MARGIN <= 4096
    assert json.loads(out.read_text())["metadata"]["max_context"] == 4096
    same = sweep_command(server, "--tokenizer", str(model), "--same-prompts")
    assert prompts(same[0]) == prompts(same[1]) == prompts(probes[0])
    for spec in itertools.chain(*sweep_command(server, "--max-context", "1024")):
        assert spec.prompt_tokens + spec.output_tokens + workloads.CHAT_TEMPLATE_MARGIN <= 1024
    assert "--max-context without --tokenizer" in capsys.readouterr().err
