"""Child processes that never outlive their parent, and who holds a TCP port.

`die_with_parent()` is a `preexec_fn` for `subprocess.Popen`: in the child, between fork and
exec, it asks Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), whatever kills
the parent (SIGKILL, the OOM killer, a supervisor's grace running out), and exits at once if
the parent is already gone. The signal is SIGTERM so a service still drains as on a normal
stop. Linux sends it when the *thread* that forked the child exits: spawn from a thread that
lives as long as the process (the launcher spawns from its main thread).

`die_with(parent)` asks the same from inside a process already running (DUET_PARENT_PID, for a
parent that cannot use a preexec_fn: kv_manager, which runs threads).

`port_holder(port)` names the process listening on a local TCP port, read from /proc, for an
error that says more than "address in use".

`launcher_children(pid)` names what a launcher runs: its services and its nats-server.
`process_stat(pid)` and `running(pid, started)` read /proc/<pid>/stat: whether a process still
runs, and is the one that started at `started` (not another that reused its pid).
"""

import ctypes
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()  # looked up in the parent: the child only calls it


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the process that spawned it dies."""
    parent = os.getpid()

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def die_with(parent: int, sig: int = signal.SIGTERM) -> None:
    """The same, asked by a process already running (a process that cannot pass a preexec_fn:
    one spawned from a multi-threaded parent): `sig` when `parent`, its parent, dies. Exits at
    once if it is gone already."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listening socket could bind host:port now. With SO_REUSEADDR, as servers bind:
    connections of a server stopped a moment ago (TIME_WAIT) do not hold the port, a listener
    does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int, proc_root: Path = Path("/proc")) -> str | None:
    """`pid N (command line)` of a process listening on TCP `port`, when /proc says so."""
    inodes = _listening_inodes(port, proc_root)
    if not inodes:
        return None
    for fd_dir in proc_root.glob("[0-9]*/fd"):
        if any(f"socket:[{inode}]" in _links(fd_dir) for inode in inodes):
            pid = fd_dir.parent.name
            return f"pid {pid} ({_command_line(fd_dir.parent)})"
    return None


def _links(fd_dir: Path) -> set[str]:
    """What a process's open file descriptors point at (those that can be read)."""
    links: set[str] = set()
    try:
        fds = list(fd_dir.iterdir())
    except OSError:  # gone, or not ours to read
        return links
    for fd in fds:
        try:
            links.add(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return links


def _listening_inodes(port: int, proc_root: Path) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (proc_root / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def _command_line(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


class ProcessStat(NamedTuple):
    state: str  # R, S, T (stopped), Z (a zombie: dead, not reaped yet), ...
    ppid: int
    started: int  # clock ticks after boot: with the pid, names one process for good


def process_stat(pid: int, proc_root: Path = Path("/proc")) -> ProcessStat | None:
    """What /proc/<pid>/stat says of a process (None: there is none)."""
    try:
        fields = (proc_root / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return ProcessStat(fields[0], int(fields[1]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def running(pid: int, started: int = 0, proc_root: Path = Path("/proc")) -> bool:
    """Whether `pid` runs (or is stopped), not a zombie, and when `started` is given, is the
    process that started then (not a later one that reused the pid)."""
    stat = process_stat(pid, proc_root)
    if stat is None or stat.state == "Z":
        return False
    return started == 0 or stat.started == started


def launcher_children(pid: int, proc_root: Path = Path("/proc")) -> dict[str, int]:
    """The live children of process `pid` by name: a Duet service by its service name
    (`python -m duetserve.services.<name>`), nats-server as "nats-server"."""
    children: dict[str, int] = {}
    for process in proc_root.glob("[0-9]*"):
        stat = process_stat(int(process.name), proc_root)
        if stat is None or stat.ppid != pid or stat.state == "Z":
            continue
        try:
            command = (process / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in command]
        services = [
            w.removeprefix("duetserve.services.") for w in words if "duetserve.services." in w
        ]
        if services:
            children[services[0]] = int(process.name)
        elif any(Path(w).name == "nats-server" for w in words):
            children["nats-server"] = int(process.name)
    return children
