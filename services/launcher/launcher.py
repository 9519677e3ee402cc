"""Start nats-server and the six services as processes, each only when the previous is ready;
stop them in reverse order on Ctrl-C or SIGTERM (each given its drain, then killed)."""

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from duetserve.common.health import query_health
from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.proto.common import HealthReply, HealthStatus
from duetserve.services.launcher.settings import LauncherSettings

logger = logging.getLogger(__name__)
# Start order: storage first, then what needs it; ingress last so nothing is accepted early.
SERVICES = ("kv_manager", "cache_index", "scheduler", "prefill_worker", "decode_worker", "ingress")
STOP_GRACE_S = 15.0


def services_for(mode: str) -> tuple[str, ...]:
    """The processes a mode starts, in start order: unified runs no decode worker."""
    if mode == "unified":
        return tuple(s for s in SERVICES if s != "decode_worker")
    return SERVICES


def compute_threads(service: str, env: dict[str, str], mode: str = "semi-pd") -> dict[str, str]:
    """Threads for a service's torch/OpenMP pool, unless OMP_NUM_THREADS says otherwise.

    The two workers each get half of the cores and every other service one thread: with
    torch's default (every core in every process) the workers' OpenMP pools oversubscribe
    the cores, and a prompt's first token waited seconds behind decode steps (measured on 2
    cores: TTFT under decode load 0.8-7.4 s with the default, 0.4-0.8 s split). This is a
    static split; the semi-PD compute share will move it at run time."""
    if "OMP_NUM_THREADS" in env:
        return {}
    cores = os.cpu_count() or 2
    if service == "prefill_worker" and mode == "unified":
        return {"OMP_NUM_THREADS": str(cores)}  # the only worker: every core
    workers = service in ("prefill_worker", "decode_worker")
    threads = max(1, cores // 2) if workers else 1
    return {"OMP_NUM_THREADS": str(threads)}


class Launcher:
    def __init__(self, settings: LauncherSettings, model_dir: Path) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.nats: NatsServer | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def environment(self, nats_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DUET_NATS_URL=nats_url,
            DUET_MODEL=str(self.model_dir.resolve()),
            DUET_PORT=str(self.settings.port),
            # `auto` resolved once, here: every service runs the same configuration.
            DUET_MODE=self.settings.mode,
            DUET_DTYPE=self.settings.dtype,
        )
        return env

    async def start(self) -> None:
        var = self.settings.var_dir
        self.nats = NatsServer(var / "nats", port=self.settings.nats_port).start()
        bus = await Bus.connect(self.nats.url, "launcher")
        try:
            env = self.environment(self.nats.url)
            for service in services_for(self.settings.mode):
                self._spawn(service, env, var / "logs")
                await self._wait_ready(bus, service)
        finally:
            await bus.close()

    def _spawn(self, service: str, env: dict[str, str], logs: Path) -> None:
        env = {**env, **compute_threads(service, env, self.settings.mode)}
        if service == "ingress" and "DUET_HEALTH_SERVICES" not in env:
            required = [s for s in services_for(self.settings.mode) if s != "ingress"]
            env["DUET_HEALTH_SERVICES"] = ",".join(required)
        logs.mkdir(parents=True, exist_ok=True)
        log = (logs / f"{service}.log").open("ab")
        command = [sys.executable, "-m", f"duetserve.services.{service}"]
        # Own process group: the terminal's Ctrl-C reaches only the launcher, which then stops
        # the services in order instead of all at once.
        self.processes[service] = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        logger.info("started %s (pid %d), log %s", service, self.processes[service].pid, log.name)

    async def _wait_ready(self, bus: Bus, service: str) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while time.monotonic() < deadline:
            process = self.processes[service]
            if process.poll() is not None:
                raise RuntimeError(
                    f"{service} exited with {process.returncode}; see .var/logs/{service}.log"
                )
            reply = (await query_health(bus, [service], timeout=0.5))[service]
            if isinstance(reply, HealthReply) and reply.status == HealthStatus.READY:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{service} not ready within {self.settings.ready_timeout_s:g}s")

    def stop(self) -> None:
        """Reverse order; each service drains on SIGTERM, and is killed after the grace."""
        for service in reversed(list(self.processes)):
            process = self.processes.pop(service)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not stop in %gs; killing it", service, STOP_GRACE_S)
                    process.kill()
                    process.wait()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
