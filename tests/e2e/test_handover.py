"""Replacing the decode worker under load (what a cuda-mps split change does, and a rolling
restart): kv_manager starts the replacement, which maps the same storage; the old worker hands
its resident requests over between two steps and exits 0. No request fails, restarts or
changes its output, and every block comes back."""

import asyncio
import time
from collections.abc import Iterator

import pytest

from duetserve.common.health import query_health
from duetserve.common.nats_bus import Bus
from duetserve.proto.common import HealthReply, HealthStatus
from duetserve.services.unit_worker.handover import request_replacement
from tests.conftest import ModelDirs
from tests.e2e.conftest import (
    Stack,
    alone_outputs,
    assert_stops_cleanly,
    seeded_completions,
    start_stack,
)
from tests.e2e.kv_probe import allocated_blocks, kv_stats
from tests.model_specs import TINY
from tests.processes import alive

PROMPTS = [f"Voyage {i}: the ship left the harbour at dawn" for i in range(4)]
# Long enough that a round decodes for several seconds (a replacement starts in about one).
MAX_TOKENS = 1200


@pytest.fixture(scope="module")
def handover_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(model_dirs.get(TINY), tmp_path_factory.mktemp("var"))
    yield stack
    assert_stops_cleanly(stack)  # kv_manager stops the replacement it started


async def _decode_instance(bus: Bus) -> str:
    reply = (await query_health(bus, ["decode_worker"], timeout=2.0))["decode_worker"]
    assert isinstance(reply, HealthReply) and reply.status == HealthStatus.READY, reply
    return reply.instance


async def _until_holding(nats_url: str, holder: str, timeout_s: float = 60.0) -> int:
    """Wait until `holder` retains KV blocks (it has requests decoding); how many."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = (await kv_stats(nats_url)).references_by_holder.get(holder, 0)
        if held:
            return held
        await asyncio.sleep(0.02)
    raise AssertionError(f"{holder} never held a block")


async def _replace_under_load(stack: Stack, old_pid: int) -> tuple[list[str], int]:
    """Two streams of rounds of seeded requests while the decode worker is replaced; every
    output, and the replacement's pid. The replacement is asked for only once the old worker
    holds residents, and each round decodes for several times longer than a replacement takes
    to start; the second stream starts a little later, so the two streams' short gaps between
    rounds (prefill only) never meet: whenever the hand-over comes, there are residents."""
    bus = await Bus.connect(stack.nats_url, "handover-test")
    try:
        old = await _decode_instance(bus)
        outputs: list[str] = []

        async def stream() -> None:
            deadline = time.monotonic() + 120
            while alive(old_pid) and time.monotonic() < deadline:
                results = await seeded_completions(stack, PROMPTS, MAX_TOKENS, 0.8)
                outputs.extend(r.choices[0].text for r in results)

        first = asyncio.create_task(stream())
        await _until_holding(stack.nats_url, old)
        second = asyncio.create_task(stream())
        await asyncio.sleep(0.2)
        await _until_holding(stack.nats_url, old)
        started = await request_replacement(bus, "unit0", "decode", old, {}, "e2e test")
        assert not hasattr(started, "code"), started
        await asyncio.gather(first, second)
        assert not alive(old_pid), "the old decode worker never handed over"
        assert await _decode_instance(bus) != old  # the replacement answers for decode now
        return outputs, started.pid  # type: ignore[union-attr]
    finally:
        await bus.close()


def test_the_decode_worker_is_replaced_under_load_without_a_pause(handover_stack: Stack) -> None:
    stack = handover_stack
    alone = alone_outputs(stack.model_dir, PROMPTS, MAX_TOKENS, 0.8)
    old_pid = stack.service_pids()["decode_worker"]
    outputs, new_pid = asyncio.run(_replace_under_load(stack, old_pid))
    assert outputs and len(outputs) % len(PROMPTS) == 0
    rounds = [outputs[i : i + len(PROMPTS)] for i in range(0, len(outputs), len(PROMPTS))]
    assert all(r == alone for r in rounds)  # none failed, restarted or changed
    assert alive(new_pid)
    log = (stack.var_dir / "logs" / "decode_worker.log").read_text()
    handed = [line for line in log.splitlines() if "handed over to" in line]
    assert len(handed) == 1 and '"exit_code": 0' in log, handed
    given = int(handed[0].split(" request(s) handed over")[0].rsplit(" ", 1)[-1])
    assert given >= 1, handed  # it had residents to give, and gave them
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=5.0))
    assert all(h.startswith("cache_index") for h in held), held
