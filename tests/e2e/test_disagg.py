"""DUET_MODE=disagg: the DistServe-style baseline. Each worker has its own KV pool and its own
copy of the weights; decode copies a request's KV out of the unit pool when it admits it, and
counts what it copied. Same API and same outputs as the other modes (all equal the runtime run
directly), even when decode's pool runs out and hand-offs wait or requests are preempted."""

import asyncio
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from duetserve.proto import kv
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.kv_pool import kv_bytes_per_block
from duetserve.runtime.loader import parse_dtype
from tests.conftest import ModelDirs
from tests.e2e.conftest import (
    Stack,
    shm_segments,
    start_stack,
    stop_stack,
)
from tests.e2e.kv_probe import allocated_blocks, kv_stats
from tests.e2e.test_memory_pressure import assert_stories_complete_as_alone
from tests.e2e.test_stack import PROMPTS, assert_greedy_matches_the_runtime
from tests.model_specs import TINY

# The unit's blocks: 40 for prefill's pool, 40 (640 token slots) for decode's, a third of what
# the memory-pressure load (eight requests of 200 tokens) needs at once.
NUM_BLOCKS = 80


@pytest.fixture(scope="module")
def disagg_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(
        model_dirs.get(TINY),
        tmp_path_factory.mktemp("var"),
        DUET_MODE="disagg",
        DUET_NUM_BLOCKS=str(NUM_BLOCKS),
        DUET_DECODE_POOL_SHARE="0.5",
    )
    yield stack
    assert stop_stack(stack) == 0


def _metric(stack: Stack, name: str) -> float:
    base = stack.base_url.removesuffix("/v1")
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return float(text.split(f"\n{name} ")[1].split()[0])


def test_each_worker_maps_its_own_pool_and_weights(disagg_stack: Stack) -> None:
    pids = disagg_stack.service_pids()
    manager, prefill, decode = (
        shm_segments(pids[n]) for n in ("kv_manager", "prefill_worker", "decode_worker")
    )
    assert len(manager) == 2 and len(prefill) == 1 and prefill < manager
    # decode runs on the other storage, and maps the unit pool only to copy KV out of it
    assert decode == manager
    pools = [asyncio.run(kv_stats(disagg_stack.nats_url, pool=p)) for p in ("", kv.DECODE_POOL)]
    assert [p.num_total for p in pools] == [NUM_BLOCKS // 2, NUM_BLOCKS // 2]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_disagg_greedy_output_equals_the_runtime_run_directly(
    disagg_stack: Stack, prompt: str
) -> None:
    assert_greedy_matches_the_runtime(disagg_stack, prompt)


def test_kv_copied_at_each_hand_off_is_counted(disagg_stack: Stack) -> None:
    stack = disagg_stack
    before = _metric(stack, "duet_kv_transfers"), _metric(stack, "duet_kv_transfer_bytes")
    api = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=60)
    prompt = "Count the boats in the harbour: " * 6
    result = api.completions.create(
        model=stack.model_dir.name, prompt=prompt, max_tokens=8, temperature=0
    )
    assert result.usage is not None
    copies = _metric(stack, "duet_kv_transfers") - before[0]
    copied = _metric(stack, "duet_kv_transfer_bytes") - before[1]
    # the KV of the prompt (the first output token is decode's to write), whole blocks of it
    config = ModelConfig.from_dir(stack.model_dir)
    per_block = kv_bytes_per_block(config, 16, parse_dtype("float32"))
    assert copies == 1
    assert copied == -(-result.usage.prompt_tokens // 16) * per_block
    assert _metric(stack, "duet_kv_transfer_seconds") > 0


def test_every_request_completes_when_decode_pool_runs_out(disagg_stack: Stack) -> None:
    """Decode's pool holds a third of what the load needs: hand-offs wait for room and
    decoding requests are preempted, yet every output is the one it gets alone and every
    block of both pools comes back."""
    stack = disagg_stack
    assert_stories_complete_as_alone(stack)
    assert asyncio.run(allocated_blocks(stack.nats_url, 5.0, kv.DECODE_POOL)) == {}
    scheduler_log = (stack.var_dir / "logs" / "scheduler.log").read_text()
    assert "preempt" in scheduler_log, "decode's pool was meant to run out"
