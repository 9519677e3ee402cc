"""Start nats-server and the six services as processes, each only when the previous is ready;
stop them on Ctrl-C or SIGTERM in three waves within one deadline (ingress, so nothing new is
accepted; then the scheduler, workers and cache index together; then kv_manager, which owns
the memory), killing what is left when the deadline passes.

No child outlives the launcher, whatever stops it: each is spawned with a parent-death signal
(SIGTERM, so services still drain). A port already taken is a start-up error that names its
holder; the launcher joins a NATS bus it did not start only when DUET_NATS_URL says so."""

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
from duetserve.common.processes import die_with_parent, port_holder, port_is_free
from duetserve.proto.common import HealthReply, HealthStatus
from duetserve.services.launcher.settings import LauncherSettings

logger = logging.getLogger(__name__)
# Start order: storage first, then what needs it; ingress last so nothing is accepted early.
SERVICES = ("kv_manager", "cache_index", "scheduler", "prefill_worker", "decode_worker", "ingress")
# Stop waves, in order, each with the share of the stop timeout it may use (kv_manager, last,
# gets what is left); what a wave leaves running when its time is up is killed.
STOP_WAVES = (
    (("ingress",), 0.5),
    (("scheduler", "prefill_worker", "decode_worker", "cache_index"), 0.3),
)
# Of its wave's time, what ingress may spend waiting for running requests before it ends them
# with a `shutting_down` error (its DUET_DRAIN_TIMEOUT_S, unless that is set).
INGRESS_DRAIN_SHARE = 0.8


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
        nats_url = self._start_nats(var)
        bus = await Bus.connect(nats_url, "launcher")
        try:
            env = self.environment(nats_url)
            for service in services_for(self.settings.mode):
                self._spawn(service, env, var / "logs")
                await self._wait_ready(bus, service)
        finally:
            await bus.close()

    def _start_nats(self, var: Path) -> str:
        """The bus URL: DUET_NATS_URL's when it is set (a bus someone else runs), else that of
        an embedded nats-server started here, on a port that must be free."""
        self._check_port(self.settings.port, "the API, DUET_PORT")
        if "nats_url" in self.settings.model_fields_set:
            logger.info("joining the NATS bus at %s (DUET_NATS_URL)", self.settings.nats_url)
            return self.settings.nats_url
        if self.settings.nats_port:
            self._check_port(self.settings.nats_port, "NATS, DUET_NATS_PORT")
        self.nats = NatsServer(
            var / "nats", port=self.settings.nats_port, preexec=die_with_parent()
        )
        return self.nats.start().url

    @staticmethod
    def _check_port(port: int, what: str) -> None:
        if port and not port_is_free(port):
            holder = port_holder(port) or "another process"
            raise RuntimeError(
                f"port {port} ({what}) is taken by {holder}; stop it, or choose another port"
            )

    def _spawn(self, service: str, env: dict[str, str], logs: Path) -> None:
        env = {**env, **compute_threads(service, env, self.settings.mode)}
        if service == "ingress" and "DUET_HEALTH_SERVICES" not in env:
            required = [s for s in services_for(self.settings.mode) if s != "ingress"]
            env["DUET_HEALTH_SERVICES"] = ",".join(required)
        if service == "ingress" and "DUET_DRAIN_TIMEOUT_S" not in env:
            (_, share), *_ = STOP_WAVES
            drain = self.settings.stop_timeout_s * share * INGRESS_DRAIN_SHARE
            env["DUET_DRAIN_TIMEOUT_S"] = f"{drain:g}"
        logs.mkdir(parents=True, exist_ok=True)
        log = (logs / f"{service}.log").open("ab")
        command = [sys.executable, "-m", f"duetserve.services.{service}"]
        # Own process group: the terminal's Ctrl-C reaches only the launcher, which then stops
        # the services in order instead of all at once.
        self.processes[service] = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
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
        """Stop every service within `stop_timeout_s` in all (see the module doc), then NATS.
        Safe twice."""
        started, total = time.monotonic(), self.settings.stop_timeout_s
        waves = [*STOP_WAVES, (tuple(self.processes), 1.0)]  # the rest, until the deadline
        spent = 0.0
        for services, share in waves:
            spent = min(1.0, spent + share)
            running = [s for s in services if s in self.processes]
            self._stop_wave(running, started + spent * total)
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def _stop_wave(self, services: list[str], deadline: float) -> None:
        running = {s: self.processes.pop(s) for s in services}
        for process in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for service, process in running.items():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", service)
                process.kill()
                process.wait()
