"""The launcher owns its processes: none outlives it, whatever kills it; a stop is bounded;
a port already taken is a start-up error that names its holder, and nothing joins a bus it
did not start."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from duetserve.common.nats_server import free_port
from tests.conftest import ModelDirs
from tests.e2e.conftest import during_long_requests, start_stack
from tests.model_specs import TINY
from tests.processes import wait_gone


def _children(pid: int) -> dict[int, str]:
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)],
        capture_output=True,
        text=True,
    ).stdout
    rows = (row.strip().partition(" ") for row in out.splitlines())
    return {int(pid): args for pid, _, args in rows}


def test_no_process_outlives_a_killed_launcher(model_dirs: ModelDirs, tmp_path: Path) -> None:
    stack = start_stack(model_dirs.get(TINY), tmp_path)
    children = _children(stack.process.pid)
    assert any("nats-server" in args for args in children.values())
    assert sum("duetserve.services." in args for args in children.values()) == 6
    stack.process.send_signal(signal.SIGKILL)  # no chance to stop anything itself
    stack.process.wait()
    left = wait_gone(list(children), timeout_s=30)
    assert not left, {pid: children[pid] for pid in left}


def test_a_stop_under_load_is_bounded_and_every_request_ends(
    model_dirs: ModelDirs, tmp_path: Path
) -> None:
    stack = start_stack(model_dirs.get(TINY), tmp_path, DUET_STOP_TIMEOUT_S="6")
    started = time.monotonic()
    ended = during_long_requests(stack, 4, lambda: stack.process.send_signal(signal.SIGTERM))
    assert stack.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 2.0 + 6 + 5  # the stop deadline, with slack
    assert len(ended) == 4
    for result in ended:  # an answer, or a 503 that says why it ended: never a cut connection
        if not isinstance(result, openai.types.Completion):
            assert isinstance(result, openai.InternalServerError), repr(result)
            assert result.status_code == 503 and isinstance(result.body, dict)
            assert result.body["code"] == "shutting_down", result.body
    assert not _children(stack.process.pid)


def _launch(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "DUET_VAR_DIR": str(tmp_path / "var"),
        "DUET_MODEL": str(tmp_path / "no-model-needed"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "duetserve.services.launcher"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("which", ["DUET_PORT", "DUET_NATS_PORT"])
def test_a_taken_port_is_a_start_up_error_that_names_its_holder(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "DUET_NATS_PORT" if which == "DUET_PORT" else "DUET_PORT"
        result = _launch(tmp_path, **{which: str(port), other: str(free_port())})
    assert result.returncode == 1
    assert f"port {port} (" in result.stderr and which in result.stderr, result.stderr
    assert f"pid {os.getpid()} (" in result.stderr, result.stderr
    assert not (tmp_path / "var" / "logs").exists()  # no service was started
