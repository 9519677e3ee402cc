"""Stopping a writer whose lease lapsed, before its blocks are given to anyone else.

A worker writes KV straight into the shared pool: refusing its messages does not stop its
writes. A worker checks its lease before every step (unit_client.Lease), but a process that
was frozen (SIGSTOP, a stalled VM, a debugger) resumes in the middle of a step without
checking. So kv_manager, which serves the pool on this machine, stops such a process
(SIGKILL) and waits until it is gone before the blocks it held go back on the free list. Its
supervisor starts a new one, a new holder.

Only the process that beat is stopped: on this host, a Duet command line, and started when
its heartbeats said (a pid reused since names another process, which is left alone). One that
cannot be stopped from here (another host or pid namespace) is logged: its blocks are freed
without that guarantee.
"""

import asyncio
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import NamedTuple

from duetserve.common.processes import running

logger = logging.getLogger(__name__)
GONE_TIMEOUT_S = 2.0


class Writer(NamedTuple):
    pid: int
    host: str
    started: int = 0  # clock ticks after boot (0: not said)


def this_host() -> str:
    return socket.gethostname()


async def stop_writer(holder: str, writer: Writer, proc: Path = Path("/proc")) -> bool:
    """SIGKILL the holder's process and wait until it is gone; True once it cannot write any
    more (stopped now, or gone already), False when it could not be stopped from here."""
    if writer.host != this_host():
        logger.warning("%s runs on %s: cannot stop it from here", holder, writer.host)
        return False
    ours = running(writer.pid, writer.started, proc) and _is_duet_process(proc / str(writer.pid))
    if not ours:
        return True  # gone (or its pid names another process now): nothing of it writes
    try:
        os.kill(writer.pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    except PermissionError:
        logger.warning("%s (pid %d): not allowed to stop it", holder, writer.pid)
        return False
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while time.monotonic() < deadline:
        if not running(writer.pid, writer.started, proc):
            logger.warning("stopped %s (pid %d): its lease lapsed", holder, writer.pid)
            return True
        await asyncio.sleep(0.01)
    logger.error("%s (pid %d) did not stop within %gs", holder, writer.pid, GONE_TIMEOUT_S)
    return False


def _is_duet_process(process: Path) -> bool:
    try:
        return b"duetserve" in (process / "cmdline").read_bytes()
    except OSError:
        return False
