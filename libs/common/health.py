"""Health over NATS: every service instance answers its service's health subject, and anyone
(ingress's `/health`, an operator's tool) can ask several services at once.

    sub = await serve_health(bus, "scheduler", instance, lambda: status)
    replies = await query_health(bus, ["scheduler", "kv_manager"], timeout=1.0)
    # {"scheduler": HealthReply(...), "kv_manager": "no responders"}

A query that cannot be decoded is answered with an ErrorReply, never ignored. A service that
does not answer shows up as a string saying why, so an aggregate can report it.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from duetserve.common.nats_bus import Bus, BusNoResponders, BusTimeout
from duetserve.proto import codec, subjects
from duetserve.proto.common import ErrorReply, HealthQuery, HealthReply, HealthStatus

logger = logging.getLogger(__name__)

StatusFn = Callable[[], HealthStatus]


async def serve_health(bus: Bus, service: str, instance: str, status: StatusFn) -> Subscription:
    """Answer `subjects.health(service)` with this instance's status; unsubscribe to stop."""

    async def answer(msg: Msg) -> None:
        try:
            codec.decode(msg.data, HealthQuery)
        except codec.ProtoError as err:
            logger.warning("bad health query", extra={"service": service, "error": str(err)})
            await bus.reply(msg, codec.encode(ErrorReply(err.code, str(err))))
            return
        await bus.reply(msg, codec.encode(HealthReply(service, instance, status())))

    return await bus.subscribe(subjects.health(service), answer)


async def query_health(
    bus: Bus, services: Sequence[str], timeout: float
) -> dict[str, HealthReply | str]:
    """Each service's reply, or why there is none; all asked at once, each within `timeout`."""
    answers = await asyncio.gather(*(_query_one(bus, service, timeout) for service in services))
    return dict(zip(services, answers, strict=True))


async def _query_one(bus: Bus, service: str, timeout: float) -> HealthReply | str:
    try:
        msg = await bus.request(
            subjects.health(service), codec.encode(HealthQuery()), timeout=timeout
        )
    except BusNoResponders:
        return "no responders"
    except BusTimeout:
        return f"no reply within {timeout:g}s"
    try:
        reply = codec.decode(msg.data, HealthReply, ErrorReply)
    except codec.ProtoError as err:
        return f"invalid reply: {err}"
    if isinstance(reply, ErrorReply):
        return f"error reply: {reply.code}: {reply.message}"
    return reply
