"""The unit's compute split moved while requests run: both workers apply every split between
iterations, no request fails, and every output is the one it gets alone; and the scheduler's
controller moves it by itself when only one latency misses its target."""

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator

import nats
import openai
import pytest

from duetserve.proto.codec import decode, encode
from duetserve.proto.compute import (
    ComputeShareApplied,
    SetComputeSplit,
    compute_applied_subject,
    compute_split_subject,
)
from tests.conftest import ModelDirs
from tests.e2e.conftest import (
    Stack,
    alone_outputs,
    seeded_completions,
    start_stack,
    stop_stack,
)
from tests.model_specs import TINY

MAX_TOKENS = 96
SPLITS = (0.3, 0.7, 0.5)


@pytest.fixture(scope="module")
def static_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(
        model_dirs.get(TINY), tmp_path_factory.mktemp("var"), DUET_SPLIT_CONTROL="static"
    )
    yield stack
    assert stop_stack(stack) == 0


async def _watch_reports(stack: Stack) -> tuple[nats.NATS, list[ComputeShareApplied]]:
    """A connection collecting every split report of the unit's workers."""
    client = await nats.connect(stack.nats_url)
    reports: list[ComputeShareApplied] = []

    async def on_applied(msg: nats.aio.msg.Msg) -> None:
        reports.append(decode(msg.data, ComputeShareApplied))

    await client.subscribe(compute_applied_subject("unit0"), cb=on_applied)
    return client, reports


async def _wait_for(
    condition: Callable[[], bool], reports: list[ComputeShareApplied], what: str
) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"{what}: {reports}"
        await asyncio.sleep(0.05)


def _metrics(stack: Stack) -> dict[str, float]:
    base = stack.base_url.removesuffix("/v1")
    body = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return {
        row.split()[0]: float(row.split()[1])
        for row in body.splitlines()
        if row.startswith(("duet_compute_prefill_share ", "duet_compute_split_moves "))
    }


async def _serve_while_splitting(
    stack: Stack, prompts: list[str]
) -> tuple[list[openai.types.Completion], list[ComputeShareApplied]]:
    client, reports = await _watch_reports(stack)
    load = asyncio.ensure_future(seeded_completions(stack, prompts, MAX_TOKENS, 0.9))
    for sequence, share in enumerate(SPLITS, start=1):
        await asyncio.sleep(0.3)
        split = SetComputeSplit(share, sequence, "test")
        await client.publish(compute_split_subject("unit0"), encode(split))
    completions = await load
    expected = 2 * len(SPLITS)
    await _wait_for(
        lambda: len({(r.role, r.sequence) for r in reports if r.sequence}) >= expected,
        reports,
        "split reports missing",
    )
    await client.close()
    return completions, reports


def test_split_moves_under_load_without_a_failed_request(static_stack: Stack) -> None:
    stack = static_stack
    prompts = [f"Tale {i}: in a land far away" for i in range(8)]
    alone = alone_outputs(stack.model_dir, prompts, MAX_TOKENS, 0.9)
    completions, reports = asyncio.run(_serve_while_splitting(stack, prompts))
    assert [c.choices[0].text for c in completions] == alone
    assert all(c.choices[0].finish_reason == "length" for c in completions)
    by_role_sequence = {(r.role, r.sequence): r for r in reports}
    for sequence, share in enumerate(SPLITS, start=1):
        prefill = by_role_sequence["prefill", sequence]
        decode_side = by_role_sequence["decode", sequence]
        assert prefill.error is None and decode_side.error is None
        assert prefill.requested == pytest.approx(share)
        assert decode_side.requested == pytest.approx(1 - share)
        assert prefill.backend == decode_side.backend
        assert prefill.backend in ("cpu-cgroup", "cpu-affinity")
        assert 0 < prefill.given <= 1 and 0 < decode_side.given <= 1
        assert prefill.description and decode_side.description


def test_metrics_show_the_split_last_set(static_stack: Stack) -> None:
    async def publish() -> None:
        client = await nats.connect(static_stack.nats_url)
        split = SetComputeSplit(0.6, 100, "operator")
        await client.publish(compute_split_subject("unit0"), encode(split))
        await client.flush()
        await client.close()

    asyncio.run(publish())
    deadline = time.monotonic() + 10
    while _metrics(static_stack)["duet_compute_prefill_share"] != pytest.approx(0.6):
        assert time.monotonic() < deadline, "the split never showed in /metrics"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ttft_starved_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A unit whose requests carry a TTFT target no split can meet and a TPOT target every
    split meets (the default SLO: they state none)."""
    stack = start_stack(
        model_dirs.get(TINY),
        tmp_path_factory.mktemp("var"),
        DUET_DEFAULT_TTFT_MS="0.001",
        DUET_DEFAULT_TPOT_MS="60000",
        DUET_SPLIT_WINDOW_SAMPLES="6",
        DUET_SPLIT_MIN_SAMPLES="3",
        DUET_SPLIT_WINDOW_S="1",
    )
    yield stack
    assert stop_stack(stack) == 0


def test_the_controller_moves_compute_to_prefill_when_only_ttft_misses(
    ttft_starved_stack: Stack,
) -> None:
    stack = ttft_starved_stack

    async def load_and_watch() -> list[ComputeShareApplied]:
        client, reports = await _watch_reports(stack)
        prompts = [f"wave n {i}" for i in range(6)]
        for _ in range(2):
            await seeded_completions(stack, prompts, 8, 0.0)
        await _wait_for(
            lambda: {"prefill", "decode"} <= {r.role for r in reports if r.sequence > 0},
            reports,
            "the controller did not move the split",
        )
        await client.close()
        return reports

    moved = [r for r in asyncio.run(load_and_watch()) if r.sequence > 0]
    assert all(r.error is None for r in moved)
    assert all(r.requested > 0.5 for r in moved if r.role == "prefill")
    assert all(r.requested < 0.5 for r in moved if r.role == "decode")
    values = _metrics(stack)
    assert values["duet_compute_prefill_share"] > 0.5
    assert values["duet_compute_split_moves"] >= 1
