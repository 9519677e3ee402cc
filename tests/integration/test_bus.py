"""Bus against a real nats-server: delivery, requests, queue groups, errors, traces, reconnect."""

import asyncio
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from duetserve.common.nats_bus import Bus, BusNoResponders, BusTimeout, Handler
from duetserve.common.nats_server import NatsServer

_subject_ids = itertools.count()


def fresh_subject(stem: str) -> str:
    """A subject no other test in the session uses (they share one server)."""
    return f"test.{stem}.{next(_subject_ids)}"


async def test_publish_reaches_subscriber(bus: Bus) -> None:
    subject = fresh_subject("pubsub")
    received: asyncio.Queue[Msg] = asyncio.Queue()
    await bus.subscribe(subject, received.put)
    await bus.flush()
    await bus.publish(subject, b"hello", headers={"x-kind": "greeting"})
    msg = await asyncio.wait_for(received.get(), 2.0)
    assert msg.data == b"hello"
    assert msg.headers is not None and msg.headers["x-kind"] == "greeting"


async def test_request_gets_reply(bus: Bus) -> None:
    subject = fresh_subject("echo")

    async def upper(msg: Msg) -> None:
        await bus.reply(msg, msg.data.upper())

    await bus.subscribe(subject, upper)
    await bus.flush()
    reply = await bus.request(subject, b"ping", timeout=2.0)
    assert reply.data == b"PING"


async def test_request_nobody_serves_fails_fast(bus: Bus) -> None:
    subject = fresh_subject("nobody")
    began = time.monotonic()
    with pytest.raises(BusNoResponders) as caught:
        await bus.request(subject, b"?", timeout=3.0)
    assert time.monotonic() - began < 1.0  # NATS says "no responders" at once
    assert isinstance(caught.value, BusTimeout) and isinstance(caught.value, TimeoutError)
    assert subject in str(caught.value)


async def test_request_without_reply_times_out(bus: Bus) -> None:
    subject = fresh_subject("silent")

    async def ignore(msg: Msg) -> None:
        pass

    await bus.subscribe(subject, ignore)
    await bus.flush()
    with pytest.raises(BusTimeout) as caught:
        await bus.request(subject, b"?", timeout=0.2)
    assert not isinstance(caught.value, BusNoResponders)
    assert caught.value.subject == subject


async def test_an_answer_to_a_message_without_a_reply_subject_is_dropped_and_logged(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    msg = Msg(bus.nc, subject="some.subject", data=b"")
    with caplog.at_level(logging.WARNING):
        await bus.reply(msg, b"")  # no exception: the handler that answers goes on
    assert "no reply subject" in caplog.text


async def test_queue_group_delivers_each_message_once(nats_server: NatsServer, bus: Bus) -> None:
    subject = fresh_subject("work")
    other = await Bus.connect(nats_server.url, "test-other")
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    done = asyncio.Event()
    count = 40

    def collector(member: str) -> Handler:
        async def handle(msg: Msg) -> None:
            got[member].append(msg.data)
            if len(got["a"]) + len(got["b"]) == count:
                done.set()

        return handle

    await bus.subscribe(subject, collector("a"), queue="workers")
    await other.subscribe(subject, collector("b"), queue="workers")
    await asyncio.gather(bus.flush(), other.flush())
    for i in range(count):
        await bus.publish(subject, str(i).encode())
    await asyncio.wait_for(done.wait(), 2.0)
    await asyncio.sleep(0.05)  # a duplicate would arrive now
    assert sorted(got["a"] + got["b"], key=int) == [str(i).encode() for i in range(count)]
    assert got["a"] and got["b"]  # shared: all 40 going to one member has odds 2**-39
    await other.close()


async def test_failing_handler_keeps_subscription(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    subject = fresh_subject("flaky")
    handled: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("cannot handle this")
        await handled.put(msg.data)

    await bus.subscribe(subject, handle)
    await bus.flush()
    with caplog.at_level(logging.ERROR, logger="duetserve.common.nats_bus"):
        await bus.publish(subject, b"bad")
        await bus.publish(subject, b"good")
        assert await asyncio.wait_for(handled.get(), 2.0) == b"good"
    [failure] = [r for r in caplog.records if r.getMessage() == "handler failed"]
    assert failure.subject == subject  # type: ignore[attr-defined]
    assert failure.exc_info is not None and "cannot handle this" in str(failure.exc_info[1])


async def test_trace_context_travels_to_handler(nats_server: NatsServer) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    traced = await Bus.connect(nats_server.url, "test-traced", tracer=tracer)
    subject = fresh_subject("traced")
    seen: asyncio.Queue[trace.SpanContext] = asyncio.Queue()

    async def handle(msg: Msg) -> None:
        await seen.put(trace.get_current_span().get_span_context())

    await traced.subscribe(subject, handle)
    await traced.flush()
    with tracer.start_as_current_span("publisher") as publisher:
        await traced.publish(subject, b"x")
    in_handler = await asyncio.wait_for(seen.get(), 2.0)
    await traced.close()

    parent = publisher.get_span_context()
    assert in_handler.trace_id == parent.trace_id
    [handler_span] = [s for s in exporter.get_finished_spans() if s.name == subject]
    assert handler_span.parent is not None and handler_span.parent.span_id == parent.span_id
    assert handler_span.kind == trace.SpanKind.CONSUMER


async def test_trace_context_passes_through_untraced_handler(bus: Bus) -> None:
    """A service that records no spans still hands its caller's trace on."""
    subject = fresh_subject("untraced")
    seen: asyncio.Queue[trace.SpanContext] = asyncio.Queue()

    async def handle(msg: Msg) -> None:
        await seen.put(trace.get_current_span().get_span_context())

    await bus.subscribe(subject, handle)
    await bus.flush()
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("publisher") as publisher:
        await bus.publish(subject, b"x")
    in_handler = await asyncio.wait_for(seen.get(), 2.0)
    assert in_handler.trace_id == publisher.get_span_context().trace_id
    assert in_handler.span_id == publisher.get_span_context().span_id


async def test_publish_works_again_after_server_restart(tmp_path: Path) -> None:
    first = NatsServer(tmp_path).start()
    restarted = NatsServer(tmp_path, first.port)
    resilient = await Bus.connect(first.url, "test-reconnect", reconnect_time_wait_s=0.05)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(msg: Msg) -> None:
        await received.put(msg.data)

    try:
        await resilient.subscribe("test.reconnect", handle)
        await resilient.flush()
        first.stop()
        await _wait_until(lambda: not resilient.is_connected, timeout_s=2.0)
        restarted.start()
        await _wait_until(lambda: resilient.is_connected, timeout_s=5.0)
        await resilient.publish("test.reconnect", b"after restart")
        assert await asyncio.wait_for(received.get(), 2.0) == b"after restart"
    finally:
        await resilient.close()
        first.stop()
        restarted.stop()


async def test_reconnect_listeners_hear_each_return_even_past_a_failing_one(
    tmp_path: Path,
) -> None:
    first = NatsServer(tmp_path).start()
    restarted = NatsServer(tmp_path, first.port)
    resilient = await Bus.connect(first.url, "test-listeners", reconnect_time_wait_s=0.05)
    heard: list[int] = []

    def failing() -> None:
        raise RuntimeError("a listener that fails")

    resilient.on_reconnected(failing)
    resilient.on_reconnected(lambda: heard.append(resilient.reconnects))
    try:
        for _ in range(2):
            first.stop()
            restarted.stop()
            await _wait_until(lambda: not resilient.is_connected, timeout_s=2.0)
            restarted.start()
            await _wait_until(lambda: resilient.is_connected, timeout_s=5.0)
            await _wait_until(lambda: len(heard) == resilient.reconnects, timeout_s=2.0)
        assert heard == [1, 2]
    finally:
        await resilient.close()
        first.stop()
        restarted.stop()


async def test_a_drain_against_a_frozen_server_gives_up_and_closes(tmp_path: Path) -> None:
    """A service stopping while nats-server is frozen (or going away with it) must not wait
    on a flush that never comes: its whole stop has 10 s."""
    server = NatsServer(tmp_path).start()
    frozen = await Bus.connect(server.url, "test-frozen")
    try:
        await frozen.subscribe("test.frozen", _ignore)
        await frozen.flush()
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        await frozen.drain()
        assert time.monotonic() - started < 4.0
        assert frozen.nc.is_closed
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        await frozen.close()
        server.stop()


async def _ignore(msg: Msg) -> None:
    pass


async def test_drain_and_close_are_safe_twice(nats_server: NatsServer) -> None:
    short_lived = await Bus.connect(nats_server.url, "test-drain")
    await short_lived.drain()
    await short_lived.drain()
    await short_lived.close()
    await short_lived.close()
    assert not short_lived.is_connected


async def test_closing_with_nats_gone_leaves_no_reconnect_loop_even_past_a_lost_cancel(
    tmp_path: Path,
) -> None:
    """Found by a killed launcher: its kv_manager never exited, its event loop waiting at
    shutdown on nats-py's reconnect loop, which had lost its one cancel (Python 3.11's wait_for
    drops a cancel that lands as a connection attempt fails) and retried the dead server
    forever. The loss is caused here by a loop in its place that drops its first cancel."""
    server = NatsServer(tmp_path).start()
    orphan = await Bus.connect(server.url, "test-gone", reconnect_time_wait_s=0.05)
    server.stop()
    await _wait_until(lambda: not orphan.is_connected, timeout_s=2.0)
    real = orphan.nc._reconnection_task
    while real is not None and not real.done():  # retrying the dead server now
        real.cancel()
        await asyncio.wait({real}, timeout=0.1)

    async def loses_a_cancel() -> None:
        lost = False
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True

    stubborn = asyncio.ensure_future(loses_a_cancel())
    orphan.nc._reconnection_task = stubborn
    await asyncio.sleep(0.01)  # running, inside its try: a cancel before its start is not lost
    try:
        await orphan.close()
        assert stubborn.done()
    finally:
        stubborn.cancel()


async def _wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
