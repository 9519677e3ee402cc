"""Who holds a port, and children that die with their parent (both read from /proc)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from duetserve.common.processes import (
    launcher_children,
    port_holder,
    port_is_free,
    process_stat,
    running,
)
from duetserve.services.kv_manager.reaper import Writer, stop_writer
from tests.processes import alive, wait_gone


def test_a_listening_port_is_taken_and_its_holder_named() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port)
        holder = port_holder(port)
        assert holder is not None and holder.startswith(f"pid {os.getpid()} (")
        assert "pytest" in holder or "python" in holder
    assert port_is_free(port) and port_holder(port) is None


def test_a_port_whose_last_connections_wait_to_close_is_free() -> None:
    """A server stopped a moment ago leaves its accepted connections in TIME_WAIT; a new server
    binds the port all the same (SO_REUSEADDR, as aiohttp and nats-server do), so the launcher
    must not call it taken (a stack restarted within a minute was refused)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    time.sleep(0.1)
    assert port_is_free(port)


GRANDPARENT = """
import subprocess, sys, time
from duetserve.common.processes import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_spawned_with_die_with_parent_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", GRANDPARENT], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert not wait_gone([child], timeout_s=10), "the child outlived its killed parent"


def test_a_launchers_children_are_named_by_service() -> None:
    service = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "-m", "duetserve.services.probe"]
    )
    try:
        deadline = time.monotonic() + 5
        while "probe" not in launcher_children(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert launcher_children(os.getpid())["probe"] == service.pid
    finally:
        service.kill()
        service.wait()
    assert "probe" not in launcher_children(os.getpid())  # reaped: gone


def test_a_process_that_asks_to_die_with_its_parent_does_even_if_the_parent_is_killed() -> None:
    """kv_manager's replacement workers: DUET_PARENT_PID makes run_service call die_with."""
    child_code = (
        "import os, time; from duetserve.common.processes import die_with; "
        "die_with(os.getppid()); print(os.getpid(), flush=True); time.sleep(30)"
    )
    parent_code = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child_code!r}]); time.sleep(30)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait()
        assert not wait_gone([child], timeout_s=5)
    finally:
        parent.kill()


def test_running_tells_a_process_from_a_later_one_that_reused_its_pid() -> None:
    me = process_stat(os.getpid())
    assert me is not None and me.ppid == os.getppid() and me.state in "RS"
    assert running(os.getpid()) and running(os.getpid(), me.started)
    assert not running(os.getpid(), me.started + 1)  # another process under this pid
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_stat(gone.pid) is None and not running(gone.pid)


async def test_the_reaper_stops_only_the_process_that_beat() -> None:
    """kv_manager kills a lapsed writer by pid: a pid since reused by another Duet process
    (another start time) must be left alone."""
    code = "import time; time.sleep(30)  # duetserve worker stand-in"
    writer = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 5
        while b"duetserve" not in Path(f"/proc/{writer.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stat = process_stat(writer.pid)
        assert stat is not None
        host = socket.gethostname()
        reused = Writer(writer.pid, host, stat.started + 1)
        assert await stop_writer("decode-1", reused)  # not ours: nothing of it writes
        assert writer.poll() is None
        assert await stop_writer("decode-1", Writer(writer.pid, host, stat.started))
        assert writer.wait(timeout=5) == -signal.SIGKILL
    finally:
        writer.kill()
        writer.wait()
