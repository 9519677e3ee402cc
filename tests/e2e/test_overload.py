"""Overload is refused cleanly: a 429 with Retry-After for what the server cannot take now, a
400 for a prompt no pool of this server could ever hold, and the server serving normally
afterwards. (Refusals by SLO, which depend on measured speed: tests/unit/test_admission.py.)"""

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.model_specs import TINY


@pytest.fixture(scope="module")
def small_stack(model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        model_dirs.get(TINY),
        tmp_path_factory.mktemp("var"),
        DUET_NUM_BLOCKS="24",  # 384 tokens of KV in all
        DUET_MAX_RUNNING="2",
        DUET_MAX_WAITING="2",
    )
    yield stack
    stop_stack(stack)


async def post(http: aiohttp.ClientSession, stack: Stack, body: dict) -> tuple[int, dict, str]:
    async with http.post(f"{stack.base_url}/completions", json=body) as response:
        return response.status, await response.json(), response.headers.get("Retry-After", "")


def test_a_flood_gets_429s_with_retry_after_and_nothing_hangs(small_stack: Stack) -> None:
    stack = small_stack
    # ignore_eos: which seeds are served depends on timing, and the random-weight model may
    # sample its end token early under some of them; every served answer must be whole.
    body = {
        "model": stack.model_dir.name,
        "prompt": "Tell me a story",
        "max_tokens": 48,
        "ignore_eos": True,
    }

    async def flood() -> list[tuple[int, dict, str]]:
        async with aiohttp.ClientSession() as http:
            answers = [post(http, stack, {**body, "seed": n}) for n in range(24)]
            results = await asyncio.wait_for(asyncio.gather(*answers), 120)
            after = await post(http, stack, body)  # once the flood is over
            return [*results, after]

    *results, after = asyncio.run(flood())
    statuses = [status for status, _, _ in results]
    assert set(statuses) == {200, 429}, statuses
    for status, answer, retry_after in results:
        if status == 429:
            assert answer["error"]["code"] == "overloaded", answer
            assert "queued" in answer["error"]["message"]
            assert int(retry_after) >= 1
        else:
            choice = answer["choices"][0]
            assert answer["usage"]["completion_tokens"] == 48, (
                f"finish_reason={choice.get('finish_reason')!r} text={choice.get('text')!r} "
                f"usage={answer['usage']}"
            )
    assert after[0] == 200


def test_a_prompt_larger_than_the_whole_pool_is_a_400(small_stack: Stack) -> None:
    stack = small_stack
    body = {"model": stack.model_dir.name, "prompt": " one" * 500, "max_tokens": 4}

    async def ask() -> tuple[int, dict, str]:
        async with aiohttp.ClientSession() as http:
            return await post(http, stack, body)

    status, answer, _ = asyncio.run(ask())
    assert status == 400, answer
    assert answer["error"]["code"] == "prompt_too_long"
    assert "KV blocks" in answer["error"]["message"]
