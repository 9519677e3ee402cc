"""A service that only reports its lifecycle, for test_lifecycle.py to run as a process.

    python sample_service.py ok|hang-drain|fail-start|crash-loop|stuck-thread|heap

Each step prints `EVENT <step>` on stdout; settings come from DUET_* variables as in any
service.
"""

import asyncio
import gc
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from duetserve.common.lifecycle import critical_task, run_service
from duetserve.common.settings import CommonSettings


class SampleService:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.started = False

    async def start(self) -> None:
        emit("start")
        if self.mode == "fail-start":
            raise RuntimeError("cannot start")
        if self.mode == "crash-loop":
            critical_task(self._crash_soon(), "sample-loop")
        if self.mode == "stuck-thread":  # as a model thread spinning in a kernel for ever
            self.model = ThreadPoolExecutor(1, thread_name_prefix="sample-model")
            self.model.submit(_spin_for_ever)
        if self.mode == "heap":  # long-lived state, as a model worker's weights and tables
            self.tables = [[i] for i in range(50_000)]
        self.started = True

    async def _crash_soon(self) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("the loop broke")

    async def ready(self) -> bool:
        return self.started

    async def drain(self) -> None:
        emit("drain")
        if self.mode == "heap":
            emit(f"frozen {gc.get_freeze_count()}")
        if self.mode == "hang-drain":
            await asyncio.sleep(3600)

    async def stop(self) -> None:
        emit("stop")


def _spin_for_ever() -> None:
    while True:
        time.sleep(0.01)


def emit(step: str) -> None:
    print(f"EVENT {step}", flush=True)


if __name__ == "__main__":
    settings = CommonSettings()
    raise SystemExit(run_service(SampleService(sys.argv[1]), settings, "sample"))
