"""A decode worker that stops while requests still decode on it (its drain ran out) ends each
of them with an error that says why, tells the scheduler they failed, and gives back their
blocks: no client is left waiting."""

import asyncio
import os
import signal
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import ModelDirs
from tests.e2e.conftest import Stack, during_long_requests, start_stack, stop_stack
from tests.e2e.kv_probe import allocated_blocks
from tests.model_specs import TINY
from tests.processes import wait_gone


@pytest.fixture
def short_drain_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(
        model_dirs.get(TINY), tmp_path_factory.mktemp("var"), DUET_DRAIN_TIMEOUT_S="1"
    )
    yield stack
    stop_stack(stack)


def test_requests_on_a_stopped_decode_worker_fail_with_a_reason(short_drain_stack: Stack) -> None:
    stack = short_drain_stack
    decode_pid = stack.service_pids()["decode_worker"]
    # SIGTERM: it drains for 1 s, then stops with its residents
    ended = during_long_requests(stack, 3, lambda: os.kill(decode_pid, signal.SIGTERM))
    assert not wait_gone([decode_pid], timeout_s=30)
    for result in ended:
        assert isinstance(result, openai.InternalServerError), repr(result)
        assert "decode worker stopped" in str(result), result
    held = asyncio.run(allocated_blocks(stack.nats_url, settle_s=5.0))
    assert all(h.startswith("cache_index") for h in held), held  # every block came back
