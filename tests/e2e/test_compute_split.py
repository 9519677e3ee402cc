"""The unit's compute split moved while requests run: both workers apply every split between
iterations, no request fails, and every output is the one it gets alone."""

import asyncio
import time
import urllib.request
from collections.abc import Iterator

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
from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.offline import OfflineEngine
from duetserve.runtime.sampling import SamplingParams
from duetserve.runtime.tokenizer import Tokenizer
from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, start_stack, stop_stack
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


def _alone(stack: Stack, prompts: list[str]) -> list[str]:
    tokenizer = Tokenizer.from_dir(stack.model_dir)
    model = load_model(stack.model_dir)
    texts = []
    for i, prompt in enumerate(prompts):
        engine = OfflineEngine(model, KVPool.allocate(model.config, 64, 16), frozenset())
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=i, ignore_eos=True)
        [out] = engine.generate([tokenizer.encode(prompt)], params)
        texts.append(tokenizer.decode(out.token_ids))
    return texts


async def _serve_while_splitting(
    stack: Stack, prompts: list[str]
) -> tuple[list[openai.types.Completion], list[ComputeShareApplied]]:
    client = await nats.connect(stack.nats_url)
    reports: list[ComputeShareApplied] = []

    async def on_applied(msg: nats.aio.msg.Msg) -> None:
        reports.append(decode(msg.data, ComputeShareApplied))

    await client.subscribe(compute_applied_subject("unit0"), cb=on_applied)
    api = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=120)
    requests = [
        asyncio.ensure_future(
            api.completions.create(
                model=stack.model_dir.name,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0.9,
                seed=i,
                extra_body={"ignore_eos": True},
            )
        )
        for i, prompt in enumerate(prompts)
    ]
    for sequence, share in enumerate(SPLITS, start=1):
        await asyncio.sleep(0.3)
        split = SetComputeSplit(share, sequence, "test")
        await client.publish(compute_split_subject("unit0"), encode(split))
    completions = await asyncio.gather(*requests)
    deadline = time.monotonic() + 10
    while len({(r.role, r.sequence) for r in reports}) < 2 * len(SPLITS):
        assert time.monotonic() < deadline, f"split reports missing: {reports}"
        await asyncio.sleep(0.05)
    await client.close()
    await api.close()
    return completions, reports


def test_split_moves_under_load_without_a_failed_request(static_stack: Stack) -> None:
    stack = static_stack
    prompts = [f"Tale {i}: in a land far away" for i in range(8)]
    alone = _alone(stack, prompts)
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
    base = static_stack.base_url.removesuffix("/v1")

    async def publish() -> None:
        client = await nats.connect(static_stack.nats_url)
        split = SetComputeSplit(0.6, 100, "operator")
        await client.publish(compute_split_subject("unit0"), encode(split))
        await client.flush()
        await client.close()

    asyncio.run(publish())
    deadline, shown = time.monotonic() + 10, None
    while shown != pytest.approx(0.6) and time.monotonic() < deadline:
        time.sleep(0.1)
        body = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        rows = [r for r in body.splitlines() if r.startswith("duet_compute_prefill_share ")]
        shown = float(rows[0].split()[1]) if rows else None
    assert shown == pytest.approx(0.6)


@pytest.fixture(scope="module")
def ttft_starved_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A unit whose TTFT target no split can meet and whose TPOT target every split meets."""
    stack = start_stack(
        model_dirs.get(TINY),
        tmp_path_factory.mktemp("var"),
        DUET_SPLIT_TTFT_SLO_MS="0.001",
        DUET_SPLIT_TPOT_SLO_MS="60000",
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
        client = await nats.connect(stack.nats_url)
        reports: list[ComputeShareApplied] = []

        async def on_applied(msg: nats.aio.msg.Msg) -> None:
            reports.append(decode(msg.data, ComputeShareApplied))

        await client.subscribe(compute_applied_subject("unit0"), cb=on_applied)
        api = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=60)
        for wave in range(2):
            await asyncio.gather(
                *(
                    api.completions.create(
                        model=stack.model_dir.name, prompt=f"wave {wave} n {i}", max_tokens=8
                    )
                    for i in range(6)
                )
            )
        deadline = time.monotonic() + 20
        while not {"prefill", "decode"} <= {r.role for r in reports if r.sequence > 0}:
            assert time.monotonic() < deadline, "the controller did not move the split"
            await asyncio.sleep(0.1)
        await client.close()
        await api.close()
        return reports

    reports = asyncio.run(load_and_watch())
    moved = [r for r in reports if r.sequence > 0]
    assert all(r.error is None for r in moved)
    assert all(r.requested > 0.5 for r in moved if r.role == "prefill")
    assert all(r.requested < 0.5 for r in moved if r.role == "decode")
    base = stack.base_url.removesuffix("/v1")
    body = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    values = {
        row.split()[0]: float(row.split()[1])
        for row in body.splitlines()
        if row.startswith(("duet_compute_prefill_share ", "duet_compute_split_moves "))
    }
    assert values["duet_compute_prefill_share"] > 0.5
    assert values["duet_compute_split_moves"] >= 1
