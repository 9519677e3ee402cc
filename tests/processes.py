"""Whether a process still runs, as the tests that stop and kill processes ask it."""

import time

from duetserve.common.processes import running


def alive(pid: int) -> bool:
    """Running (an exited child its parent has not reaped yet is a zombie: not alive)."""
    return running(pid)


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Those of `pids` still alive after waiting up to `timeout_s` for all of them to end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]
