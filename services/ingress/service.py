"""The ingress service: the OpenAI-compatible HTTP API in front of the scheduler.

start: load the tokenizer and the model's context length, connect to NATS, answer health,
       serve HTTP (aiohttp, on the loop run_service runs: uvloop).
drain: refuse new generation requests (503 in OpenAI's shape), wait for those in flight.
stop:  close the HTTP server (what is still running is cancelled, which cancels it at the
       scheduler too), then drain the NATS connection.

Imports no torch: ingress never runs a model.
"""

import asyncio
import logging
import secrets

from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from duetserve.common.health import serve_health
from duetserve.common.lengths import LengthPredictor
from duetserve.common.lifecycle import cancel_tasks, critical_task
from duetserve.common.nats_bus import Bus
from duetserve.proto import codec, subjects
from duetserve.proto.common import HealthReply, HealthStatus
from duetserve.proto.supervision import LAUNCHER_REPORT, SupervisorReport
from duetserve.runtime.config import ModelConfig
from duetserve.runtime.tokenizer import Tokenizer
from duetserve.services.ingress.attainment import CompoundGroups
from duetserve.services.ingress.generation import Admission, GenerationContext
from duetserve.services.ingress.handlers import Handlers, HealthCheck, SemanticCaching
from duetserve.services.ingress.metrics import IngressMetrics
from duetserve.services.ingress.middlewares import middlewares
from duetserve.services.ingress.prompts import ModelLimits, default_slo
from duetserve.services.ingress.semantic import SemanticClient
from duetserve.services.ingress.settings import SERVICE_NAME, IngressSettings
from duetserve.services.ingress.streams import StreamRouter
from duetserve.services.ingress.tenants import TenantResolver
from duetserve.services.ingress.units import UnitDirectory
from duetserve.services.ingress.watch import StreamWatch

logger = logging.getLogger(__name__)

# Part of the stop timeout that aiohttp gives running handlers before it cancels them.
_HTTP_SHUTDOWN_SHARE = 0.5
# The share of drain_timeout_s that running requests get to finish before they are ended.
_DRAIN_PATIENCE_SHARE = 0.8


class IngressService:
    def __init__(self, settings: IngressSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_name(SERVICE_NAME)
        self.metrics = IngressMetrics(settings.model_id)
        self.admission = Admission(self.metrics.in_flight)
        self.status = HealthStatus.STARTING
        self._bus: Bus | None = None
        self._health_subscription: Subscription | None = None
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None
        self._router: StreamRouter | None = None
        self.units = UnitDirectory(settings.unit)

    @property
    def port(self) -> int:
        """The port the HTTP server listens on (the one the OS chose when settings say 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("ingress is not serving")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        settings = self.settings
        tokenizer = Tokenizer.from_dir(settings.model)
        config = ModelConfig.from_dir(settings.model)
        tenants = TenantResolver.from_settings(settings.api_keys, settings.api_keys_file)
        self._bus = await Bus.connect(
            settings.nats_url,
            self.instance,
            request_timeout_s=settings.request_timeout_s,
            access=settings.nats_access("ingress"),
        )
        self._health_subscription = await serve_health(
            self._bus, SERVICE_NAME, self.instance, lambda: self.status
        )
        await self._bus.subscribe(LAUNCHER_REPORT, self._on_launcher_report)
        limits = ModelLimits(
            context_len=config.max_context_len,
            vocab_size=min(config.vocab_size, tokenizer.vocab_size),
            default_slo=default_slo(settings.default_ttft_ms, settings.default_tpot_ms),
        )
        # One subscription for the tokens of every request this ingress serves.
        stream = subjects.stream_name(self.instance, secrets.token_hex(4))
        self._router = router = StreamRouter(self._bus, stream, self.metrics.token_replays)
        await router.start()
        self.units.start(self._bus)  # the live units and their load (units.py)
        lengths = None
        if settings.predict_lengths:
            lengths = await asyncio.to_thread(LengthPredictor, settings.length_model)
        context = GenerationContext(
            self._bus,
            router,
            tokenizer,
            self.metrics,
            settings.submit_timeout_s,
            CompoundGroups(),
            lengths,
            settings.unit,
            self.units,
        )
        semantic = None
        if settings.semantic_cache:
            client = SemanticClient(
                self._bus,
                settings.semantic_lookup_timeout_s,
                self.metrics.semantic_lookups,
                self.metrics.semantic_inserts,
            )
            semantic = SemanticCaching(client, settings.semantic_full_load_requests)
        handlers = Handlers(
            settings.model_id,
            limits,
            context,
            tenants,
            self.admission,
            self._health_check(),
            semantic,
        )
        watch = StreamWatch(
            self._bus,
            lambda: self.admission.generations,
            router,
            quiet_s=settings.stream_quiet_s,
            unreachable_s=settings.stream_unreachable_s,
            units=self.units,
        )
        self._watch = critical_task(watch.run(), "stream-watch")
        await self._serve_http(handlers)
        self.status = HealthStatus.READY
        logger.info(
            "serving",
            extra={"model": settings.model_id, "host": settings.host, "port": self.port},
        )

    async def _on_launcher_report(self, msg: Msg) -> None:
        try:
            self.metrics.restarts.report = codec.decode(msg.data, SupervisorReport)
        except codec.ProtoError as err:
            logger.warning("dropped a malformed launcher report", extra={"error": str(err)})

    def _health_check(self) -> HealthCheck:
        def own() -> HealthReply:
            return HealthReply(SERVICE_NAME, self.instance, self.status)

        services = tuple(s for s in self.settings.health_services if s != SERVICE_NAME)
        return HealthCheck(services, self.settings.health_timeout_s, own)

    async def _serve_http(self, handlers: Handlers) -> None:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes, middlewares=middlewares(self.metrics)
        )
        app.add_routes(handlers.routes())
        self._runner = web.AppRunner(
            app,
            handle_signals=False,  # run_service owns the signals
            handler_cancellation=True,  # a client that goes away cancels its request
            access_log=logging.getLogger("aiohttp.access") if self.settings.access_log else None,
            shutdown_timeout=self.settings.stop_timeout_s * _HTTP_SHUTDOWN_SHARE,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()

    async def ready(self) -> bool:
        return self.status == HealthStatus.READY

    async def drain(self) -> None:
        """Refuse new requests; let running ones finish until most of the drain time is
        spent, then end the rest with a `shutting_down` error (never a hang, never a cut
        connection) and wait for their answers to be written."""
        self.status = HealthStatus.DRAINING
        self.admission.stop_accepting()
        logger.info("draining", extra={"in_flight": self.admission.in_flight})
        patience = self.settings.drain_timeout_s * _DRAIN_PATIENCE_SHARE
        try:
            await asyncio.wait_for(self.admission.wait_idle(), patience)
        except TimeoutError:
            ended = self.admission.shut_down_all()
            logger.warning("drain deadline: %d request(s) ended as shutting_down", ended)
            await self.admission.wait_idle()

    async def stop(self) -> None:
        await self.units.stop()
        if self._watch is not None:
            await cancel_tasks([self._watch])
            self._watch = None
        if self._router is not None:
            await self._router.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._health_subscription = None  # the bus's drain ends every subscription
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.drain()
