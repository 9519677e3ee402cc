"""serve_health and query_health over a real nats-server."""

from nats.aio.msg import Msg

from duetserve.common.health import query_health, serve_health
from duetserve.common.nats_bus import Bus
from duetserve.proto import codec, subjects
from duetserve.proto.common import ErrorReply, HealthReply, HealthStatus


async def test_a_served_health_answers_with_the_current_status(bus: Bus) -> None:
    status = HealthStatus.STARTING
    subscription = await serve_health(bus, "scheduler", "scheduler-0", lambda: status)
    replies = await query_health(bus, ["scheduler"], timeout=1.0)
    assert replies == {"scheduler": HealthReply("scheduler", "scheduler-0", HealthStatus.STARTING)}
    status = HealthStatus.READY
    replies = await query_health(bus, ["scheduler"], timeout=1.0)
    assert replies["scheduler"] == HealthReply("scheduler", "scheduler-0", HealthStatus.READY)
    await subscription.unsubscribe()


async def test_missing_silent_and_confused_services_say_why(bus: Bus) -> None:
    async def silent(msg: Msg) -> None:
        return None

    async def confused(msg: Msg) -> None:
        await bus.reply(msg, b"\x01")

    await bus.subscribe(subjects.health("kv_manager"), silent)
    await bus.subscribe(subjects.health("cache_index"), confused)
    replies = await query_health(bus, ["decode_worker", "kv_manager", "cache_index"], timeout=0.2)
    assert replies["decode_worker"] == "no responders"
    assert replies["kv_manager"] == "no reply within 0.2s"
    assert isinstance(replies["cache_index"], str)
    assert replies["cache_index"].startswith("invalid reply")


async def test_a_query_that_is_not_a_health_query_gets_an_error_reply(bus: Bus) -> None:
    await serve_health(bus, "prefill_worker", "p-0", lambda: HealthStatus.READY)
    msg = await bus.request(subjects.health("prefill_worker"), b"not msgpack", timeout=1.0)
    reply = codec.decode(msg.data, ErrorReply)
    assert reply.code == "invalid_message"
    replies = await query_health(bus, ["prefill_worker"], timeout=1.0)
    assert isinstance(replies["prefill_worker"], HealthReply)
