"""The producer's side of the token streams against a real nats-server that goes away."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.common.token_outbox import TokenOutbox
from duetserve.proto import codec, subjects
from duetserve.proto.tokens import ReplayFrom, ReplayQuery, TokenBatch, TokenChunk

STREAM = "ingress-test-1"
TOKENS = tuple(range(1000, 3000))  # a few KB a chunk: the reconnect buffer fills quickly


async def test_publishing_while_nats_is_away_never_raises_and_what_was_lost_is_replayed(
    tmp_path: Path,
) -> None:
    """While NATS is away nats-py buffers publishes, then refuses them (its buffer is full);
    the decode loop publishing every step must not die of it. The outbox keeps what it could
    not send, and sends it again when asked once NATS is back."""
    first = NatsServer(tmp_path).start()
    restarted = NatsServer(tmp_path, first.port)
    producer = await Bus.connect(first.url, "producer", reconnect_time_wait_s=0.05)
    outbox = TokenOutbox(producer, "decode_worker-test")
    await outbox.start()
    ingress: Bus | None = None
    try:
        first.stop()
        await _until(lambda: not producer.is_connected)
        chunks = [TokenChunk("r-1", n * len(TOKENS), TOKENS) for n in range(400)]
        for chunk in chunks:  # 400 steps of ~6 KB: past the 2 MiB reconnect buffer
            outbox.add(STREAM, chunk)
            await outbox.flush()
        assert outbox.publish_failures > 0
        restarted.start()
        await _until(lambda: producer.is_connected, timeout_s=5.0)

        ingress = await Bus.connect(first.url, "ingress")
        replays: asyncio.Queue[TokenBatch] = asyncio.Queue()

        async def on_batch(msg: Msg) -> None:
            batch = codec.decode(msg.data, TokenBatch)
            if batch.seq == 0:
                replays.put_nowait(batch)

        await ingress.subscribe(subjects.tokens(STREAM), on_batch)
        await ingress.flush()
        wanted = (ReplayFrom("r-1", chunks[-3].index),)
        await ingress.publish(subjects.TOKENS_REPLAY, codec.encode(ReplayQuery(STREAM, wanted)))
        replay = await asyncio.wait_for(replays.get(), 3.0)
        assert replay.producer == outbox.producer
        assert replay.chunks == tuple(chunks[-3:])  # the last ones, never sent, are there
    finally:
        if ingress is not None:
            await ingress.close()
        await producer.close()
        first.stop()
        restarted.stop()


async def _until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
