"""Who holds a port, and children that die with their parent (both read from /proc)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from duetserve.common.processes import port_holder, port_is_free


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


GRANDPARENT = """
import subprocess, sys, time
from duetserve.common.processes import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_child_spawned_with_die_with_parent_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", GRANDPARENT], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its killed parent"
