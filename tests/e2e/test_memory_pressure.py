"""A KV pool far too small for the load: decode runs out of blocks, the scheduler preempts by
recompute, and every request still completes with exactly the tokens it would get alone."""

import asyncio
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import ModelDirs
from tests.e2e.conftest import (
    Stack,
    alone_outputs,
    seeded_completions,
    start_stack,
    stop_stack,
)
from tests.e2e.kv_probe import allocated_blocks
from tests.model_specs import TINY

NUM_BLOCKS = 40  # 640 token slots; the load below needs ~1,700 at once
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def small_pool_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(
        model_dirs.get(TINY), tmp_path_factory.mktemp("var"), DUET_NUM_BLOCKS=str(NUM_BLOCKS)
    )
    yield stack
    assert stop_stack(stack) == 0


def assert_stories_complete_as_alone(stack: Stack) -> None:
    """Eight seeded requests of MAX_TOKENS at once: each gets every token, its output is the
    one it gets alone, and then no block is held but the prefix cache's."""
    prompts = [f"Story {i}: once upon a time" for i in range(8)]
    alone = alone_outputs(stack.model_dir, prompts, MAX_TOKENS, 0.9)
    results = asyncio.run(seeded_completions(stack, prompts, MAX_TOKENS, 0.9))
    assert [r.usage.completion_tokens for r in results if r.usage] == [MAX_TOKENS] * 8
    assert [r.choices[0].text for r in results] == alone
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=5.0))
    assert all(h.startswith("cache_index") for h in held), held


def test_every_request_completes_under_preemption(small_pool_stack: Stack) -> None:
    stack = small_pool_stack
    assert_stories_complete_as_alone(stack)
    scheduler_log = (stack.var_dir / "logs" / "scheduler.log").read_text()
    decode_log = (stack.var_dir / "logs" / "decode_worker.log").read_text()
    assert "preempt" in scheduler_log + decode_log, "the pool was meant to run out"


def test_a_pool_full_of_cached_prefixes_still_admits_new_prompts(small_pool_stack: Stack) -> None:
    """Distinct long prompts one after another: the prefix cache keeps each one's blocks until
    the pool is all cache, and nothing decodes long enough to run short and make it evict. The
    next prompt must still be admitted (the scheduler asks the cache for the blocks it
    lacks), not wait forever."""
    stack = small_pool_stack
    api = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=30)
    prompt_tokens = []
    for i in range(6):  # each needs over a quarter of the pool
        prompt = f"Ledger {i}: " + " ".join(f"entry {i}-{j} paid" for j in range(45))
        result = api.completions.create(model=stack.model_dir.name, prompt=prompt, max_tokens=2)
        assert result.usage is not None
        prompt_tokens.append(result.usage.prompt_tokens)
    assert min(prompt_tokens) > NUM_BLOCKS * 16 // 4, prompt_tokens
