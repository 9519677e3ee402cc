"""A decode worker that answers late (frozen a moment, its lease intact) costs its requests a
pause, never their answers: the scheduler keeps their blocks and offers them again, and the
worker takes an offer of a request it already has as accepted."""

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, alone_outputs, seeded_completions, start_stack, stop_stack
from tests.model_specs import TINY

PROMPTS = [f"Letter {n}: dear friend, the weather here" for n in range(6)]
MAX_TOKENS = 16


@pytest.fixture
def impatient_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # Every request on the bus times out after 1 s: a 3 s freeze outlasts several hand-offs,
    # and not the decode worker's lease (5 s).
    stack = start_stack(
        model_dirs.get(TINY), tmp_path_factory.mktemp("var"), DUET_REQUEST_TIMEOUT_S="1"
    )
    yield stack
    stop_stack(stack)


def test_hand_offs_to_a_decode_worker_that_answers_late_are_offered_again(
    impatient_stack: Stack,
) -> None:
    stack = impatient_stack
    decode_pid = stack.service_pids()["decode_worker"]

    async def run() -> list[object]:
        os.kill(decode_pid, signal.SIGSTOP)
        try:  # the prompts are prefilled meanwhile; their hand-offs time out
            requests = asyncio.ensure_future(
                seeded_completions(stack, PROMPTS, MAX_TOKENS, 0.8, stagger_s=0.3)
            )
            await asyncio.sleep(3.0)
        finally:
            os.kill(decode_pid, signal.SIGCONT)
        return await asyncio.wait_for(requests, 60)

    started = time.monotonic()
    results = asyncio.run(run())
    assert time.monotonic() - started < 60
    texts = [r.choices[0].text for r in results]  # type: ignore[attr-defined]
    assert texts == alone_outputs(stack.model_dir, PROMPTS, MAX_TOKENS, 0.8)
    log = (stack.var_dir / "logs" / "scheduler.log").read_text()
    assert "not answered, offered again" in log  # the freeze did strike hand-offs
    assert stack.service_pids()["decode_worker"] == decode_pid  # the same worker throughout
