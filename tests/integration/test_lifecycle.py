"""run_service in a real process: ready, SIGTERM, drain, stop, exit code; steps that fail."""

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from duetserve.common.lifecycle import serve
from duetserve.common.settings import CommonSettings

SAMPLE_SERVICE = Path(__file__).with_name("sample_service.py")


class ServiceProcess:
    """The sample service as a child process, its stdout and stderr read line by line."""

    def __init__(self, mode: str, **env: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SAMPLE_SERVICE), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "DUET_LOG_FORMAT": "json", **env},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_log(self, msg: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.05)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith("{") and json.loads(line)["msg"] == msg:
                return
        raise AssertionError(f"no {msg!r} log line; output so far: {self.seen}")

    def finish(self, timeout_s: float = 10.0) -> int:
        code = self.process.wait(timeout_s)
        time.sleep(0.05)  # let the reader thread take the last lines
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code

    def events(self) -> list[str]:
        return [line.removeprefix("EVENT ") for line in self.seen if line.startswith("EVENT ")]

    def logs(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.seen if line.startswith("{")]


def test_sigterm_drains_then_stops_and_exits_zero() -> None:
    service = ServiceProcess("ok")
    service.wait_for_log("ready")
    service.process.send_signal(signal.SIGTERM)
    assert service.finish() == 0
    assert service.events() == ["start", "drain", "stop"]
    messages = [line["msg"] for line in service.logs()]
    assert messages.index("ready") < messages.index("stopping") < messages.index("stop done")
    assert {"service": "sample"}.items() <= service.logs()[-1].items()


def test_hanging_drain_is_cut_off_and_stop_still_runs() -> None:
    service = ServiceProcess("hang-drain", DUET_DRAIN_TIMEOUT_S="0.3")
    service.wait_for_log("ready")
    began = time.monotonic()
    service.process.send_signal(signal.SIGINT)
    assert service.finish() == 1
    assert time.monotonic() - began < 3.0
    assert service.events() == ["start", "drain", "stop"]
    assert "drain timed out" in [line["msg"] for line in service.logs()]


def test_a_crashed_background_task_stops_the_service_loudly() -> None:
    """A step loop that dies must not leave a half-alive process: it drains, stops, exits 1."""
    service = ServiceProcess("crash-loop")
    assert service.finish() == 1
    assert service.events() == ["start", "drain", "stop"]
    [crash] = [
        line for line in service.logs() if line["msg"] == "background task crashed; stopping"
    ]
    assert "the loop broke" in str(crash["exc"])


def test_a_thread_that_never_returns_does_not_keep_the_process_alive() -> None:
    """A worker's model thread stuck in a loop kept its process alive after its stop, for
    ever: the interpreter joins executor threads at exit (an orphan spun for 46 minutes)."""
    service = ServiceProcess("stuck-thread")
    service.wait_for_log("ready")
    service.process.send_signal(signal.SIGTERM)
    assert service.finish(timeout_s=10.0) == 1  # it exits, and says it did not end cleanly
    stuck = [line for line in service.logs() if line["msg"] == "threads still running at exit"]
    assert stuck and "sample-model" in str(stuck[0]["threads"])


def test_a_ready_process_freezes_its_start_up_heap() -> None:
    """A full collection walked every object a service started with: ~100 ms on a model
    worker, a stall in the middle of a decode step or a stream. Once ready, they are frozen
    out of the collector's sight; the 50,000 tables built in start among them."""
    service = ServiceProcess("heap")
    service.wait_for_log("ready")
    service.process.send_signal(signal.SIGTERM)
    assert service.finish() == 0
    [frozen] = [event for event in service.events() if event.startswith("frozen ")]
    assert int(frozen.split()[1]) > 50_000  # the tables, at least


def test_failed_start_still_stops_and_exits_one() -> None:
    service = ServiceProcess("fail-start")
    assert service.finish() == 1
    assert service.events() == ["start", "stop"]
    [failure] = [line for line in service.logs() if line["msg"] == "start failed"]
    assert "cannot start" in str(failure["exc"])


class SlowToBeReady:
    """Ready on the third poll; records the order of its steps."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.polls = 0

    async def start(self) -> None:
        self.steps.append("start")

    async def ready(self) -> bool:
        self.polls += 1
        return self.polls >= 3

    async def drain(self) -> None:
        self.steps.append("drain")

    async def stop(self) -> None:
        self.steps.append("stop")


async def test_serve_waits_for_ready_and_for_the_stop_event() -> None:
    service = SlowToBeReady()
    stop_requested = asyncio.Event()
    serving = asyncio.create_task(
        serve(service, CommonSettings(), "inline", stop_requested, handle_signals=False)
    )
    await asyncio.sleep(0.3)
    assert service.polls == 3 and service.steps == ["start"]
    stop_requested.set()
    assert await asyncio.wait_for(serving, 2.0) == 0
    assert service.steps == ["start", "drain", "stop"]
