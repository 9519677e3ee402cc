"""A KV pool far too small for the load: decode runs out of blocks, the scheduler preempts by
recompute, and every request still completes with exactly the tokens it would get alone."""

import asyncio
from collections.abc import Iterator

import openai
import pytest

from duetserve.runtime.kv_pool import KVPool
from duetserve.runtime.loader import load_model
from duetserve.runtime.offline import OfflineEngine
from duetserve.runtime.sampling import SamplingParams
from duetserve.runtime.tokenizer import Tokenizer
from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, start_stack, stop_stack
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


def test_every_request_completes_under_preemption(small_pool_stack: Stack) -> None:
    stack = small_pool_stack
    prompts = [f"Story {i}: once upon a time" for i in range(8)]
    tokenizer = Tokenizer.from_dir(stack.model_dir)
    model = load_model(stack.model_dir)
    alone = []
    for i, prompt in enumerate(prompts):
        engine = OfflineEngine(model, KVPool.allocate(model.config, 64, 16), frozenset())
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=i, ignore_eos=True)
        [out] = engine.generate([tokenizer.encode(prompt)], params)
        alone.append(tokenizer.decode(out.token_ids))

    async def crowd() -> list[openai.types.Completion]:
        api = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=120)
        return await asyncio.gather(
            *(
                api.completions.create(
                    model=stack.model_dir.name,
                    prompt=prompt,
                    max_tokens=MAX_TOKENS,
                    temperature=0.9,
                    seed=i,
                    extra_body={"ignore_eos": True},
                )
                for i, prompt in enumerate(prompts)
            )
        )

    results = asyncio.run(crowd())
    assert [r.usage.completion_tokens for r in results if r.usage] == [MAX_TOKENS] * 8
    assert [r.choices[0].text for r in results] == alone
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=5.0))
    assert set(held) <= {"cache_index"}, held
    scheduler_log = (stack.var_dir / "logs" / "scheduler.log").read_text()
    decode_log = (stack.var_dir / "logs" / "decode_worker.log").read_text()
    assert "preempt" in scheduler_log + decode_log, "the pool was meant to run out"
