"""DUET_MODE=unified: one worker runs prefill chunks and decode steps in the same forward pass;
same API, same outputs as semi-pd (both equal the runtime run directly)."""

import asyncio
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from duetserve.runtime.tokenizer import Tokenizer
from tests.conftest import ModelDirs
from tests.e2e.conftest import (
    Stack,
    alone_outputs,
    seeded_completions,
    start_stack,
    stop_stack,
)
from tests.e2e.test_stack import PROMPTS, assert_greedy_matches_the_runtime
from tests.model_specs import TINY


@pytest.fixture(scope="module")
def unified_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # a small token budget, so long prompts are chunked across steps shared with decodes
    stack = start_stack(
        model_dirs.get(TINY),
        tmp_path_factory.mktemp("var"),
        DUET_MODE="unified",
        DUET_MAX_PREFILL_TOKENS="48",
    )
    yield stack
    assert stop_stack(stack) == 0


def test_unified_runs_no_decode_worker_and_is_healthy(unified_stack: Stack) -> None:
    services = unified_stack.service_pids()
    assert "prefill_worker" in services and "decode_worker" not in services
    base = unified_stack.base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        assert response.status == 200


@pytest.mark.parametrize("prompt", PROMPTS)
def test_unified_greedy_output_equals_the_runtime_run_directly(
    unified_stack: Stack, prompt: str
) -> None:
    assert_greedy_matches_the_runtime(unified_stack, prompt)


def test_unified_mixed_steps_give_every_request_its_alone_output(unified_stack: Stack) -> None:
    """Long prompts arrive while others decode: their chunks share forward passes with the
    decodes, and every seeded output is still the one it gets alone."""
    stack = unified_stack
    prompts = [f"Chapter {i}. " + "the river ran past the mill " * (3 + 4 * i) for i in range(6)]
    alone = alone_outputs(stack.model_dir, prompts, 40, 0.8)
    results = asyncio.run(seeded_completions(stack, prompts, 40, 0.8, stagger_s=0.05))
    assert [r.choices[0].text for r in results] == alone
    tokenizer = Tokenizer.from_dir(stack.model_dir)
    assert max(len(tokenizer.encode(p)) for p in prompts) > 48  # some prompts were chunked


@pytest.fixture(scope="module")
def semi_pd_small_budget_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(
        model_dirs.get(TINY), tmp_path_factory.mktemp("var"), DUET_MAX_PREFILL_TOKENS="48"
    )
    yield stack
    assert stop_stack(stack) == 0


@pytest.mark.parametrize("stack_name", ["unified_stack", "semi_pd_small_budget_stack"])
def test_a_chunked_prompt_seen_before_starts_after_its_cached_prefix(
    stack_name: str, request: pytest.FixtureRequest
) -> None:
    """A prompt longer than the token budget, sent twice: the second finds its prefix in the
    cache, computes only the rest (one short chunk) and answers the same."""
    stack: Stack = request.getfixturevalue(stack_name)
    api = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=30)
    prompt = "A lighthouse keeper counted the ships. " * 12  # well over the 48-token budget
    answers = [
        api.completions.create(
            model=stack.model_dir.name, prompt=prompt, max_tokens=12, temperature=0
        )
        for _ in range(2)
    ]
    assert answers[1].choices[0].text == answers[0].choices[0].text
    usage = answers[1].usage
    assert usage is not None and usage.prompt_tokens > 48
    details = usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= usage.prompt_tokens - 16
