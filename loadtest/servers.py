"""A server process for a benchmark: started, waited for until its URL answers 200, stopped.

    with running_server(command, env, log_path, "http://127.0.0.1:8000/health", 300):
        ...  # measure it

The process gets a session of its own; on leaving the block it gets SIGINT (a launcher drains
its services, vLLM shuts down), and its whole process group is killed after a minute.
"""

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


@contextlib.contextmanager
def running_server(
    command: Sequence[str],
    env: Mapping[str, str] | None,
    log_path: Path,
    ready_url: str,
    timeout_s: float,
) -> Iterator[subprocess.Popen[bytes]]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            list(command),
            env=None if env is None else dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not answers(ready_url):
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited with {process.returncode}: {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} not ready in {timeout_s:g} s: {log_path}")
                time.sleep(1.0)
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def answers(url: str) -> bool:
    """Whether GET `url` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
