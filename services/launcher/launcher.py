"""Start nats-server and the six services as processes, each only when the previous is ready;
supervise them while they serve (a service that crashes is restarted with backoff, and
kv_manager's crash restarts the unit with it: supervision.py); stop them on Ctrl-C or SIGTERM
in three waves within one deadline (ingress, so nothing new is accepted; then the scheduler,
workers and cache index together; then kv_manager, which owns the memory), killing what is left
when the deadline passes.

No child outlives the launcher, whatever stops it: each is spawned with a parent-death signal
(SIGTERM, so services still drain). A port already taken is a start-up error that names its
holder; the launcher joins a NATS bus it did not start only when DUET_NATS_URL says so."""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from duetserve.common import nats_auth
from duetserve.common.health import query_health
from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.common.processes import die_with_parent, port_holder, port_is_free
from duetserve.common.settings import default_instance_name
from duetserve.proto.codec import encode
from duetserve.proto.common import HealthReply, HealthStatus
from duetserve.proto.supervision import LAUNCHER_REPORT, SupervisorReport
from duetserve.services.cache_index.semantic_categories import category_names
from duetserve.services.launcher.settings import LauncherSettings
from duetserve.services.launcher.supervision import Backoff, crashed, restart_group

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
NATS = "nats-server"  # its name among the restart counts
SUPERVISE_EVERY_S = 0.2
REPORT_EVERY_S = 2.0
# How long a service stopped because kv_manager crashed gets to exit before it is killed.
UNIT_STOP_GRACE_S = 2.0


def services_for(mode: str) -> tuple[str, ...]:
    """The processes a mode starts, in start order: unified runs no decode worker."""
    if mode == "unified":
        return tuple(s for s in SERVICES if s != "decode_worker")
    return SERVICES


# Rounds an OpenMP thread of a worker beside another spins at a barrier before it sleeps:
# long enough to bridge the gaps between the ops of a forward pass (tens of microseconds),
# short enough to give the core up soon when its worker waits for work.
SIDE_BY_SIDE_SPINS = 10_000


def compute_threads(service: str, env: dict[str, str], mode: str = "semi-pd") -> dict[str, str]:
    """Threads for a service's torch/OpenMP pool, unless OMP_NUM_THREADS says otherwise.

    The two workers each start on half of the cores and every other service on one thread:
    with torch's default (every core in every process) the workers' OpenMP pools oversubscribe
    the cores, and a prompt's first token waited seconds behind decode steps (measured on 2
    cores: TTFT under decode load 0.8-7.4 s with the default, 0.4-0.8 s split). The compute
    share then sets each worker's threads (all of the unit's cores under the work-conserving
    cgroup weight). Two workers side by side spin only briefly at OpenMP barriers
    (GOMP_SPINCOUNT=SIDE_BY_SIDE_SPINS, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set), then
    sleep: a thread spinning for libgomp's default 300,000 rounds holds a core the other worker
    could use (semi-pd bfloat16 at 3 req/s, 2 cores: 97% within SLO passive, 57% spinning),
    while one that sleeps at once (OMP_WAIT_POLICY=PASSIVE) is woken ~200 times a step, between
    the ops of a forward pass: a decode worker alone stepped 32 sequences in 26 ms passive, 19.6
    ms with 10,000 rounds, 18.5 ms in unified mode (docs/benchmarks.md)."""
    threads: dict[str, str] = {}
    cores = os.cpu_count() or 2
    workers = service in ("prefill_worker", "decode_worker")
    if "OMP_NUM_THREADS" not in env:
        if service == "prefill_worker" and mode == "unified":
            threads["OMP_NUM_THREADS"] = str(cores)  # the only worker: every core
        else:
            threads["OMP_NUM_THREADS"] = str(max(1, cores // 2) if workers else 1)
    if workers and mode != "unified" and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(env):
        threads["GOMP_SPINCOUNT"] = str(SIDE_BY_SIDE_SPINS)
    return threads


class Launcher:
    def __init__(self, settings: LauncherSettings, model_dir: Path) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.nats: NatsServer | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.started_at: dict[str, float] = {}  # monotonic, of each service's current process
        self.restarts: Counter[str] = Counter()
        self.instance = default_instance_name("launcher")
        self.bus: Bus | None = None
        self._env: dict[str, str] = {}
        self._backoff = Backoff()
        self._exited: set[str] = set()  # ended with 0 on their own: not restarted
        self._owed: set[str] = set()  # crashed (or stopped with kv_manager): to start again
        self._owed_at = 0.0  # monotonic time from which they may start (their backoff)
        # The bus's credentials (made on first start when the launcher runs NATS) and the CA
        # its certificate is verified with; None: the bus has none (DUET_NATS_URL's may).
        self.credentials_dir: Path | None = settings.nats_credentials_dir
        self.tls_ca: Path | None = settings.nats_tls_ca

    def environment(self, nats_url: str) -> dict[str, str]:
        env = dict(os.environ)
        if self.credentials_dir is not None:
            env["DUET_NATS_CREDENTIALS_DIR"] = str(self.credentials_dir.resolve())
        if self.tls_ca is not None:
            env["DUET_NATS_TLS_CA"] = str(self.tls_ca.resolve())
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
        self.bus = await Bus.connect(nats_url, self.instance, access=self._access())
        self._env = self.environment(nats_url)
        for service in services_for(self.settings.mode):
            self._spawn(service)
            await self._wait_ready(service)

    async def close(self) -> None:
        """Leave the bus (before `stop`, from the loop that started the launcher)."""
        bus, self.bus = self.bus, None
        if bus is not None:
            await bus.close()

    # --- supervision (supervision.py says what is restarted and when) -----------------------

    async def supervise(self) -> None:
        """Until cancelled: restart what crashes, and report the restart counts."""
        next_report = 0.0
        while True:
            self._check_nats()
            for service, process in list(self.processes.items()):
                code = process.poll()
                if code is None or service in self._exited or service in self._owed:
                    continue
                if not crashed(code):
                    logger.info("%s exited with 0 on its own; not restarting it", service)
                    self._exited.add(service)
                    continue
                await self._on_crash(service, code)
                next_report = 0.0  # at once: a restart is news
            if self._owed and time.monotonic() >= self._owed_at:
                await self._start_owed()
            if time.monotonic() >= next_report:
                await self._report()
                next_report = time.monotonic() + REPORT_EVERY_S
            await asyncio.sleep(SUPERVISE_EVERY_S)

    def _check_nats(self) -> None:
        """The embedded nats-server, started again on its port if it died; the services
        reconnect to it on their own."""
        if self.nats is None or self.nats.is_running:
            return
        logger.error("nats-server died; starting it again on port %d", self.nats.port)
        self.restarts[NATS] += 1
        self.nats.start()

    async def _on_crash(self, service: str, code: int) -> None:
        """`service` crashed: it (and for kv_manager, the unit, stopped now) is owed a start
        once its backoff has passed."""
        ran_s = time.monotonic() - self.started_at.get(service, time.monotonic())
        delay = self._backoff.delay(service, ran_s)
        group = restart_group(service, tuple(self.processes))
        also = [s for s in group if s != service]
        logger.error(
            "%s exited with %s after %.1fs; restarting it in %.1fs%s",
            service,
            f"signal {-code}" if code < 0 else f"code {code}",
            ran_s,
            delay,
            f", and with it {', '.join(also)}" if also else "",
        )
        self._owed.update(group)
        self._owed_at = max(self._owed_at, time.monotonic() + delay)
        await asyncio.to_thread(self._stop_now, also)
        if service == "kv_manager":
            remove_stale_segments(self.processes[service].pid, self._env.get("DUET_REGION"))

    async def _start_owed(self) -> None:
        """Start what is owed: kv_manager first when it is, then the rest together (they need
        only kv_manager). A crash while they start leaves the rest owed for the next round."""
        owed = [s for s in self.processes if s in self._owed]
        root = [s for s in owed if s == "kv_manager"]
        for wave in (root, [s for s in owed if s not in root]):
            for name in wave:
                self._owed.discard(name)
                self._spawn(name)
                self.restarts[name] += 1
            for name in wave:
                if not await self._wait_ready(name, abort_on_crash=True):
                    return
        logger.info("%s serving again", ", ".join(owed))

    def _stop_now(self, services: list[str]) -> None:
        """SIGTERM, then SIGKILL after a short grace (kv_manager is gone: nothing to drain)."""
        for service in services:
            if self.processes[service].poll() is None:
                self.processes[service].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + UNIT_STOP_GRACE_S
        for service in services:
            process = self.processes[service]
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    async def _report(self) -> None:
        if self.bus is None or not self.bus.is_connected:
            return
        pids = {s: p.pid for s, p in self.processes.items() if p.poll() is None}
        report = SupervisorReport(self.instance, dict(self.restarts), pids)
        with contextlib.suppress(Exception):  # a report is lost, the next one comes
            await self.bus.publish(LAUNCHER_REPORT, encode(report))

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
            var / "nats",
            port=self.settings.nats_port,
            preexec=die_with_parent(),
            config_file=self._write_nats_config(var),
            tls=self.settings.nats_tls_cert is not None,
        )
        return self.nats.start().url

    def _write_nats_config(self, var: Path) -> Path:
        """Users with the permissions of this mode, from the credentials (made on first start,
        under DUET_VAR_DIR/credentials unless DUET_NATS_CREDENTIALS_DIR says where), and TLS
        when a certificate is configured."""
        s = self.settings
        self.credentials_dir = s.nats_credentials_dir or var / "credentials"
        credentials = nats_auth.ensure_credentials(self.credentials_dir)
        tls = None
        if s.nats_tls_cert is not None and s.nats_tls_key is not None:
            tls = nats_auth.TlsFiles(s.nats_tls_cert.resolve(), s.nats_tls_key.resolve())
            self.tls_ca = s.nats_tls_ca or s.nats_tls_cert
        # cache_index may keep the semantic cache's answers in a JetStream bucket per category.
        categories = category_names(s.semantic_categories)
        config = nats_auth.server_config(credentials, s.mode, (s.unit,), tls, categories)
        logger.info(
            "NATS users and permissions for %s mode; credentials in %s",
            s.mode,
            self.credentials_dir,
        )
        return nats_auth.write_private(var / "nats" / "nats.conf", config)

    def _access(self) -> nats_auth.NatsAccess:
        return nats_auth.access("launcher", self.credentials_dir, self.tls_ca)

    @staticmethod
    def _check_port(port: int, what: str) -> None:
        if port and not port_is_free(port):
            holder = port_holder(port) or "another process"
            raise RuntimeError(
                f"port {port} ({what}) is taken by {holder}; stop it, or choose another port"
            )

    def _spawn(self, service: str) -> None:
        env, logs = self._env, self.settings.var_dir / "logs"
        env = {**env, **compute_threads(service, env, self.settings.mode)}
        if service == "ingress" and "DUET_HEALTH_SERVICES" not in env:
            required = [s for s in services_for(self.settings.mode) if s != "ingress"]
            env["DUET_HEALTH_SERVICES"] = ",".join(required)
        if service == "ingress" and "DUET_DRAIN_TIMEOUT_S" not in env:
            (_, share), *_ = STOP_WAVES
            drain = self.settings.stop_timeout_s * share * INGRESS_DRAIN_SHARE
            env["DUET_DRAIN_TIMEOUT_S"] = f"{drain:g}"
        if service == "cache_index" and "DUET_SEMANTIC_STORE" not in env:
            # The semantic cache's answers outlive a restart, beside the stack's other state.
            env["DUET_SEMANTIC_STORE"] = str((self.settings.var_dir / "semantic.sqlite").resolve())
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
        self.started_at[service] = time.monotonic()
        self._exited.discard(service)
        logger.info("started %s (pid %d), log %s", service, self.processes[service].pid, log.name)

    async def _wait_ready(self, service: str, abort_on_crash: bool = False) -> bool:
        """Wait until `service` reports ready. At start-up a service that exits or never gets
        ready is an error; while supervising (`abort_on_crash`) the wait ends, False, as soon
        as any service has crashed (the supervisor handles it), or after the ready timeout."""
        assert self.bus is not None
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while time.monotonic() < deadline:
            if abort_on_crash and self._any_crashed():
                return False
            process = self.processes[service]
            if process.poll() is not None:
                raise RuntimeError(
                    f"{service} exited with {process.returncode}; see .var/logs/{service}.log"
                )
            reply = (await query_health(self.bus, [service], timeout=0.5))[service]
            if isinstance(reply, HealthReply) and reply.status == HealthStatus.READY:
                return True
            await asyncio.sleep(0.2)
        if abort_on_crash:
            logger.error("%s not ready within %gs", service, self.settings.ready_timeout_s)
            return False
        raise RuntimeError(f"{service} not ready within {self.settings.ready_timeout_s:g}s")

    def _any_crashed(self) -> bool:
        """Whether a service crashed that supervision has not taken up yet."""
        return any(
            (code := p.poll()) is not None and crashed(code) and s not in self._owed
            for s, p in self.processes.items()
        )

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


def remove_stale_segments(pid: int, region: str | None, shm: Path = Path("/dev/shm")) -> None:
    """Unlink the /dev/shm segments a kv_manager that crashed left behind (a clean stop unlinks
    them itself): those named after its pid (`duet-<unit>-<pid>`, and `-decode` beside it in
    disagg mode), or after DUET_REGION when that names them, and the workers' activity file
    beside each (compute_share/activity.py). The memory is freed once the last process that
    mapped it is gone."""
    if region is not None:
        regions = [region, f"{region}-decode"]
        paths = [shm / name for r in regions for name in (r, f"{r}.activity")]
    else:
        paths = [
            p for p in shm.glob("duet-*") if str(pid) in p.name.removesuffix(".activity").split("-")
        ]
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
            logger.info("removed %s, left by kv_manager (pid %d)", path, pid)
