"""The one NATS connection helper every service uses.

`Bus` wraps a nats-py client with what every service would otherwise repeat: reconnecting
forever, logging connection events, typed timeouts, trace context in the headers of every
message, and subscription handlers that cannot kill their subscription.

Handlers of one subscription run one at a time, in arrival order (nats-py's semantics); a
handler that must not hold up the next message hands its work to a task of its own.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Tracer

from duetserve.common.nats_auth import NatsAccess
from duetserve.common.tracing import active_tracer, extract_context, inject_headers

logger = logging.getLogger(__name__)

Handler = Callable[[Msg], Awaitable[None]]
DRAIN_TIMEOUT_S = 2.0  # a drain the server does not complete by then closes instead
STOP_RECONNECT_TRIES = 50  # cancels of a reconnect loop that outlived close(), 0.1 s apart


class BusError(Exception):
    """A NATS operation failed."""


class BusTimeout(BusError, TimeoutError):
    """A request got no reply in time."""

    def __init__(self, subject: str, timeout: float, reason: str = "no reply") -> None:
        super().__init__(f"request to {subject!r}: {reason} within {timeout:g}s")
        self.subject = subject
        self.timeout = timeout


class BusNoResponders(BusTimeout):
    """A request went to a subject nobody subscribes to (NATS answered at once)."""

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(subject, timeout, reason="no responders")


class Bus:
    """A NATS connection: publish, request, subscribe, reply, drain, close."""

    def __init__(
        self,
        nc: Client,
        request_timeout_s: float,
        tracer: Tracer | None,
        events: "_ConnectionEvents | None" = None,
    ) -> None:
        self.nc = nc
        self.request_timeout_s = request_timeout_s
        self._tracer = tracer
        self._js: JetStreamContext | None = None
        self._events = events

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        request_timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        reconnect_time_wait_s: float = 0.25,
        tracer: Tracer | None = None,
        access: NatsAccess | None = None,
    ) -> "Bus":
        """Connect to `url` as `name`, then reconnect forever whenever the connection drops.

        `access`: the role's credentials, inbox and TLS context (common/nats_auth.py); none on
        a bus without authentication. `tracer` records the handler spans; by default the one
        `setup_tracing` turned on.
        """
        access = access or NatsAccess()
        credentials = access.credentials
        nc = Client()
        events = _ConnectionEvents(nc, name)
        await nc.connect(
            url,
            name=name,
            user=credentials.user if credentials else None,
            password=credentials.password if credentials else None,
            inbox_prefix=access.inbox_prefix,
            tls=access.tls,
            connect_timeout=connect_timeout_s,  # type: ignore[arg-type]  # nats-py says int
            reconnect_time_wait=reconnect_time_wait_s,  # type: ignore[arg-type]
            max_reconnect_attempts=-1,
            error_cb=events.on_error,
            disconnected_cb=events.on_disconnected,
            reconnected_cb=events.on_reconnected,
            closed_cb=events.on_closed,
        )
        logger.info("connected to NATS", extra={"url": url, "connection": name})
        return cls(nc, request_timeout_s, tracer, events)

    @property
    def js(self) -> JetStreamContext:
        """JetStream on this connection."""
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    async def key_value(self, bucket: str, ttl_s: float) -> KeyValue:
        """A JetStream key-value bucket, created (entries living `ttl_s` after their last
        write, one revision kept) if no process has created it yet."""
        try:
            return await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(bucket=bucket, ttl=ttl_s, history=1)
            try:
                return await self.js.create_key_value(config)
            except nats.js.errors.BadRequestError:  # created meanwhile by another process
                return await self.js.key_value(bucket)

    @property
    def is_connected(self) -> bool:
        return self.nc.is_connected

    @property
    def reconnects(self) -> int:
        """Times the connection came back after it dropped (each a window in which messages
        to and from this process may have been lost)."""
        return self._events.reconnects if self._events is not None else 0

    def on_reconnected(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from nats-py's task, so it must not block) each time the connection
        comes back after it dropped: a request in flight across the gap may have lost its
        message or its reply."""
        if self._events is not None:
            self._events.reconnect_listeners.append(listener)

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish `payload` on `subject`, with the current trace context in its headers."""
        await self.nc.publish(subject, payload, headers=_outgoing_headers(headers))

    async def request(
        self,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Msg:
        """Send a request and wait for its reply; BusTimeout (or BusNoResponders) if none."""
        wait_s = self.request_timeout_s if timeout is None else timeout
        try:
            return await self.nc.request(
                subject, payload, timeout=wait_s, headers=_outgoing_headers(headers)
            )
        except nats.errors.NoRespondersError:
            raise BusNoResponders(subject, wait_s) from None
        except nats.errors.TimeoutError:
            raise BusTimeout(subject, wait_s) from None

    async def reply(
        self, msg: Msg, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer the request `msg`. A message that came without a reply subject (published to
        a request subject by mistake, or by a stranger) has no one to answer: that is logged,
        and the answer dropped."""
        if not msg.reply:
            logger.warning(
                "no reply subject to answer on; answer dropped", extra={"subject": msg.subject}
            )
            return
        await self.publish(msg.reply, payload, headers)

    async def subscribe(
        self, subject: str, handler: Handler, queue: str | None = None
    ) -> Subscription:
        """Call `handler` for each message on `subject` (one member of `queue` gets each).

        The handler runs with the sender's trace context current (inside a span named after
        `subject` while tracing is on). An exception it raises is logged with the subject and
        the subscription carries on with the next message.
        """

        async def dispatch(msg: Msg) -> None:
            await self._dispatch(subject, handler, msg)

        return await self.nc.subscribe(subject, queue=queue or "", cb=dispatch)

    async def _dispatch(self, subject: str, handler: Handler, msg: Msg) -> None:
        token = otel_context.attach(extract_context(msg.headers)) if msg.headers else None
        try:
            tracer = self._tracer or active_tracer()
            if tracer is None:
                await handler(msg)
            else:
                attributes = {"messaging.system": "nats", "messaging.destination.name": msg.subject}
                with tracer.start_as_current_span(
                    subject, kind=SpanKind.CONSUMER, attributes=attributes
                ):
                    await handler(msg)
        except Exception:
            logger.exception(
                "handler failed", extra={"subject": msg.subject, "subscription": subject}
            )
        finally:
            if token is not None:
                otel_context.detach(token)

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait until the server has everything published so far."""
        await self.nc.flush(timeout=timeout)  # type: ignore[arg-type]  # nats-py says int

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Finish the messages already received, stop receiving, flush, close; within
        `timeout_s`, or close at once (a server that is gone or frozen never answers the
        flush, and a stopping service must not wait on it). Safe twice."""
        if self.nc.is_closed or self.nc.is_draining:
            return
        # Not asyncio.wait_for: nats-py's drain swallows a cancel and goes on to a flush of
        # its own, so the drain runs as a task, and the connection is closed under it.
        draining = asyncio.ensure_future(self.nc.drain())
        done, _ = await asyncio.wait({draining}, timeout=timeout_s)
        if draining in done and not draining.cancelled() and draining.exception() is None:
            return
        error = draining.exception() if draining in done and not draining.cancelled() else None
        logger.warning("drain failed; closing", extra={"error": repr(error or "timed out")})
        try:
            await self.close()
        finally:
            if not draining.done():
                draining.cancel()
                await asyncio.wait({draining}, timeout=1.0)

    async def close(self) -> None:
        """Close the connection at once, dropping what is still queued. Safe twice, and when
        the server went away under it."""
        try:
            await self.nc.close()
        except nats.errors.Error:
            pass
        except RuntimeError as err:  # uvloop: its transport closed as nats-py flushed to it
            logger.warning("closed over a lost connection", extra={"error": repr(err)})
        await self._stop_reconnecting()

    async def _stop_reconnecting(self) -> None:
        """Leave no reconnect loop running. nats-py cancels its loop once; a cancel that lands
        as a connection attempt fails is lost inside asyncio.wait_for (Python 3.11), and the
        loop, which never looks at the client's state, then retries a dead server forever:
        the process never exits, its event loop waiting on that task at shutdown (a killed
        launcher's kv_manager did). Cancelled again until it is done, within a bound."""
        task = self.nc._reconnection_task
        for _ in range(STOP_RECONNECT_TRIES):
            if task is None or task.done():
                return
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        logger.error("the NATS reconnect loop would not stop")


def _outgoing_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """A copy of `headers` plus the trace context; None when both are empty."""
    return inject_headers(dict(headers) if headers else {}) or None


class _ConnectionEvents:
    """Logs what happens to one connection; nats-py calls these from its own tasks.

    While the server is away nats-py reports every failed reconnect attempt as an error; the
    first is a warning, the rest are debug lines until the connection is back.
    """

    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.name = name
        self.errors_since_connected = 0
        self.reconnects = 0
        self.permission_violations = 0
        self.reconnect_listeners: list[Callable[[], None]] = []

    async def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            # A subject this role may not use: a gap in nats_auth.permissions, or a process
            # acting beyond its role. Never quietened.
            self.permission_violations += 1
            logger.error("NATS refused: %s", exc, extra={"connection": self.name})
            return
        level = logging.WARNING if self.errors_since_connected == 0 else logging.DEBUG
        self.errors_since_connected += 1
        logger.log(level, "NATS error", extra={"connection": self.name, "error": repr(exc)})

    async def on_disconnected(self) -> None:
        logger.warning("disconnected from NATS", extra={"connection": self.name})

    async def on_reconnected(self) -> None:
        self.errors_since_connected = 0
        self.reconnects += 1
        url = self.nc.connected_url.geturl() if self.nc.connected_url else None
        logger.info("reconnected to NATS", extra={"connection": self.name, "url": url})
        for listener in self.reconnect_listeners:
            try:
                listener()
            except Exception:  # one listener's failure must not keep the others from hearing
                logger.exception("reconnect listener failed", extra={"connection": self.name})

    async def on_closed(self) -> None:
        logger.info("NATS connection closed", extra={"connection": self.name})
