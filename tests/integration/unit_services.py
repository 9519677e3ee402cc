"""kv_manager and cache_index for integration tests: started in the test's own event loop
(start()/stop() called directly) or as `python -m` processes, each test on a unit of its own so
that tests sharing one nats-server never meet."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

from duetserve.common.nats_bus import Bus, BusTimeout
from duetserve.proto import kv, subjects
from duetserve.proto.codec import decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.services.cache_index.service import CacheIndexService
from duetserve.services.cache_index.settings import CacheIndexSettings
from duetserve.services.kv_manager.service import KVManagerService
from duetserve.services.kv_manager.settings import KVManagerSettings
from duetserve.services.scheduler.service import SchedulerService
from duetserve.services.scheduler.settings import SchedulerSettings

T = TypeVar("T")


def new_unit() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def running_kv_manager(
    nats_url: str, model_dir: Path, **overrides: Any
) -> AsyncIterator[KVManagerService]:
    unit = overrides.pop("unit", None) or new_unit()
    options: dict[str, Any] = {"storage": "cpu", "num_blocks": 8, "region": f"duet-{unit}"}
    options.update(overrides)
    settings = KVManagerSettings(nats_url=nats_url, model=model_dir, unit=unit, **options)
    service = KVManagerService(settings)
    try:
        await service.start()
        yield service
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def running_cache_index(
    nats_url: str, unit: str, **overrides: Any
) -> AsyncIterator[CacheIndexService]:
    settings = CacheIndexSettings(nats_url=nats_url, unit=unit, **overrides)
    service = CacheIndexService(settings)
    try:
        await service.start()
        yield service
    finally:
        await service.stop()


async def ask(bus: Bus, subject: str, message: object, expected: type[T]) -> T | ErrorReply:
    """Send a request; its reply, which must be `expected` or an ErrorReply."""
    reply = await bus.request(subject, encode(message))
    answer: T | ErrorReply = decode(reply.data, expected, ErrorReply)
    return answer


async def ask_ok(bus: Bus, subject: str, message: object, expected: type[T]) -> T:
    answer = await ask(bus, subject, message, expected)
    assert isinstance(answer, expected), answer
    return answer


async def num_free(bus: Bus, unit: str) -> int:
    """kv_manager's free count, read by releasing an owner that holds nothing."""
    released = await ask_ok(
        bus, subjects.kv(unit, "release"), kv.ReleaseBlocks("probe/none"), kv.BlocksReleased
    )
    assert released.num_freed == 0
    return released.num_free


async def wait_for_reply(bus: Bus, subject: str, message: object, timeout_s: float = 30.0) -> bytes:
    """The first reply to `message` on `subject`, asking again until someone answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            reply = await bus.request(subject, encode(message), timeout=0.5)
            return bytes(reply.data)
        except BusTimeout:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


class ServiceProcess:
    """`python -m duetserve.services.<module>` with DUET_* settings from `env`, its output
    collected line by line."""

    def __init__(self, module: str, **env: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"duetserve.services.{module}"],
            env={**os.environ, "DUET_LOG_FORMAT": "json", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    async def wait_for_output(self, text: str, timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not any(text in line for line in self.lines):
            assert loop.time() < deadline, f"no {text!r} in: {self.output}"
            assert self.process.poll() is None, f"exited: {self.output}"
            await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM; the exit code (killed if it has not exited within `timeout_s`)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = await asyncio.to_thread(self.process.wait)
        await asyncio.to_thread(self._reader.join, 5.0)
        return code


@contextlib.asynccontextmanager
async def running_scheduler(
    nats_url: str, model_dir: Path, num_blocks: int = 32, **overrides: Any
) -> AsyncIterator[str]:
    """A scheduler (semi-pd, a static split, unless `overrides` say otherwise) over a
    kv_manager and a cache_index of a unit of its own; the unit's name until the block ends.
    Its workers are the test's to play."""
    host_kv_mb = overrides.get("host_kv_mb", 0.0)  # a host tier: kv_manager serves it
    async with running_kv_manager(
        nats_url, model_dir, num_blocks=num_blocks, host_kv_mb=host_kv_mb
    ) as kv_manager:
        unit = kv_manager.settings.unit
        async with running_cache_index(nats_url, unit, host_kv_mb=host_kv_mb):
            options: dict[str, Any] = {"mode": "semi-pd", "split_control": "static"}
            options.update(overrides)
            scheduler = SchedulerService(SchedulerSettings(nats_url=nats_url, unit=unit, **options))
            await scheduler.start()
            try:
                yield unit
            finally:
                await scheduler.stop()
