"""Worker processes kv_manager starts to replace the unit's workers (proto/compute.py: a split
that needs a new process under cuda-mps, or an operator's rolling restart).

kv_manager is the unit's resident process: it holds the storage a replacement maps, so it is
the one that starts it. The replacement gets kv_manager's own environment (the unit's DUET_
settings, as the launcher or the deployment gave them), the few overrides the request may carry
(its share, its threads) and DUET_REPLACES, the instance it takes over from. kv_manager keeps
the process; at drain it stops the replacements it started (each drains its residents while
kv_manager still serves their releases).
"""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from duetserve.proto.compute import ReplacementStarted, ReplaceWorker

logger = logging.getLogger(__name__)
STOP_GRACE_S = 15.0


class Replacements:
    def __init__(self, log_dir: Path | None) -> None:
        """`log_dir`: where replacements append to `<role>_worker.log` (the log of the worker
        they replace); None: to kv_manager's own output."""
        self.log_dir = log_dir
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, request: ReplaceWorker) -> ReplacementStarted:
        env = {**os.environ, **request.env, "DUET_REPLACES": request.replaces}
        # It ends with kv_manager, whatever ends kv_manager (a preexec_fn is not safe here:
        # kv_manager runs threads), as the launcher's children end with the launcher.
        env["DUET_PARENT_PID"] = str(os.getpid())
        env.pop("DUET_INSTANCE", None)  # the replacement names itself
        command = [sys.executable, "-m", f"duetserve.services.{request.role}_worker"]
        with contextlib.ExitStack() as stack:
            output = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                output = stack.enter_context(
                    (self.log_dir / f"{request.role}_worker.log").open("ab")
                )
            process = subprocess.Popen(
                command,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                start_new_session=True,
            )
        self.children.append(process)
        logger.info(
            "started a %s worker (pid %d) to replace %s: %s",
            request.role,
            process.pid,
            request.replaces,
            request.reason or "no reason given",
            extra={"overrides": sorted(request.env)},
        )
        return ReplacementStarted(request.role, request.replaces, process.pid)

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.children if p.poll() is None]

    async def stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every replacement still running (each drains), then kill what outlives the
        grace."""
        running = self.running()
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                await asyncio.to_thread(process.wait, grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("replacement worker %d did not stop; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)
        self.children = []
