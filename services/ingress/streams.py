"""This ingress's token streams (proto/tokens.py): one subscription, a stream per request.

The StreamRouter subscribes to the ingress's stream subject once, and hands each chunk of each
TokenBatch to the TokenStream of its request. A TokenStream hands its chunks out strictly in
index order: the first token comes from a prefill worker and the rest from a decode worker, so
chunks may arrive out of order, or twice (a replay); they are buffered by index, and what was
handed out already is dropped. An ERROR chunk ends the stream at once, whatever its index: a
failed request has no more tokens to wait for.

Chunks are lost on the bus now and then (core NATS is at most once; a producer may fail to
publish while NATS is away). The router asks the producers again (a ReplayQuery), shortly after
it sees
- a batch number skipped by a producer: every stream this ingress waits on is asked after,
  since the lost batch may have held any of them, its last chunk included;
- a stream holding chunks past a hole in its indexes.
The stream watch asks after quiet streams the same way (services/ingress/watch.py).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from duetserve.common.nats_bus import Bus, BusError
from duetserve.proto import codec, subjects
from duetserve.proto.tokens import FinishReason, ReplayFrom, ReplayQuery, TokenBatch, TokenChunk

logger = logging.getLogger(__name__)

GAP_GRACE_S = 0.05  # a hole may be a chunk still on its way: wait this long before asking
MAX_QUERY_REQUESTS = 2048  # requests named by one ReplayQuery
PRODUCER_MEMORY_S = 600.0  # a producer unheard this long is forgotten (it restarted, or left)


class ChunkOrderer:
    """Chunks in, the ones that continue the stream out, in order (pure; no I/O)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_index = 0
        self.ended = False
        self._pending: dict[int, TokenChunk] = {}

    @property
    def has_gap(self) -> bool:
        """Chunks wait past a hole: what comes before them is late, or lost."""
        return bool(self._pending) and not self.ended

    def push(self, chunk: TokenChunk) -> list[TokenChunk]:
        """The chunks `chunk` makes deliverable: none, itself, or a buffered run after it."""
        if self.ended:
            return []
        if chunk.finish_reason == FinishReason.ERROR or chunk.migrating:
            self.ended = chunk.finish_reason is not None
            return [chunk]
        end = chunk.index + len(chunk.token_ids)
        if chunk.index < self.next_index:
            if end <= self.next_index and not (end == self.next_index and chunk.finish_reason):
                return []  # had all of it already (a replay, a duplicate)
            chunk = _tail(chunk, self.next_index)
        held = self._pending.get(chunk.index)
        if held is None or len(chunk.token_ids) > len(held.token_ids) or chunk.finish_reason:
            self._pending[chunk.index] = chunk
        ready = []
        while (head := self._pending.pop(self.next_index, None)) is not None:
            ready.append(head)
            self.next_index += len(head.token_ids)
            if head.finish_reason is not None:
                self.ended = True
                self._pending.clear()
                break
        return ready


def _tail(chunk: TokenChunk, index: int) -> TokenChunk:
    """The part of `chunk` from `index` on (its earlier tokens were handed out already)."""
    skip = index - chunk.index
    return TokenChunk(
        chunk.request_id,
        index,
        chunk.token_ids[skip:],
        chunk.logprobs[skip:],
        chunk.finish_reason,
        chunk.error,
    )


class TokenStream:
    """One request's chunks, in order. Opened by the router before the request is submitted."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._orderer = ChunkOrderer(request_id)
        self._ready: asyncio.Queue[TokenChunk] = asyncio.Queue()
        self.last_heard = time.monotonic()  # when a chunk last arrived (or the stream opened)

    @property
    def next_index(self) -> int:
        """The index of the first token it has not had."""
        return self._orderer.next_index

    @property
    def has_gap(self) -> bool:
        return self._orderer.has_gap

    def arrive(self, chunk: TokenChunk) -> None:
        self.last_heard = time.monotonic()
        for ready in self._orderer.push(chunk):
            self._ready.put_nowait(ready)

    async def next(self) -> TokenChunk:
        """The next chunk in index order, waiting for it as long as it takes."""
        return await self._ready.get()

    def end_here(self, index: int, reason: FinishReason) -> None:
        """End the stream at `index` without the bus (its last chunk was lost)."""
        self.arrive(TokenChunk(self.request_id, index, (), finish_reason=reason))

    def interrupt(self, error: str) -> None:
        """End the stream here, without the bus: the next chunk is an ERROR saying `error`."""
        ending = TokenChunk(self.request_id, 0, (), finish_reason=FinishReason.ERROR, error=error)
        self._ready.put_nowait(ending)


class StreamRouter:
    """The ingress's stream subject: batches in, chunks to their streams, lost ones asked for."""

    def __init__(self, bus: Bus, stream: str, replays: Counter | None = None) -> None:
        self.bus, self.stream = bus, stream
        self._streams: dict[str, TokenStream] = {}
        self._heard: dict[str, tuple[int, float]] = {}  # producer -> (last seq, when)
        self._due: dict[str, str] = {}  # request id -> why it is to be asked after
        self._asking: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._replays = replays
        self.lost_batches = 0  # batch numbers skipped, since the start

    async def start(self) -> None:
        self._subscription = await self.bus.subscribe(subjects.tokens(self.stream), self._on_batch)

    async def stop(self) -> None:
        if self._asking is not None:
            self._asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._asking
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    def open(self, request_id: str) -> TokenStream:
        stream = self._streams[request_id] = TokenStream(request_id)
        return stream

    def close(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._due.pop(request_id, None)

    async def _on_batch(self, msg: Msg) -> None:
        try:
            batch = codec.decode(msg.data, TokenBatch)
        except codec.ProtoError as err:
            logger.warning("dropped a malformed token batch", extra={"error": str(err)})
            return
        if batch.seq:
            self._count(batch.producer, batch.seq)
        for chunk in batch.chunks:
            stream = self._streams.get(chunk.request_id)
            if stream is None:
                continue  # ended and closed already: a late chunk, a replay
            stream.arrive(chunk)
            if stream.has_gap:
                self.ask_soon([stream], "gap")

    def _count(self, producer: str, seq: int) -> None:
        """Note batch `seq` of `producer`; numbers skipped are batches lost. (Each producer
        numbers its batches to this stream from 1, and the stream is this run's own, so a
        first batch numbered above 1 means the ones before it were lost too.)"""
        now = time.monotonic()
        last = self._heard[producer][0] if producer in self._heard else 0
        if seq > last + 1:
            self.lost_batches += seq - last - 1
            logger.warning("lost %d token batch(es) from %s", seq - last - 1, producer)
            self.ask_soon(self._streams.values(), "lost_batch")
        self._heard[producer] = (max(seq, last), now)
        if len(self._heard) > 64:
            horizon = now - PRODUCER_MEMORY_S
            self._heard = {p: h for p, h in self._heard.items() if h[1] >= horizon}

    def ask_soon(self, streams: Iterable[TokenStream], why: str) -> None:
        """Ask after these streams in a moment (together with any others due by then)."""
        for stream in streams:
            self._due.setdefault(stream.request_id, why)
        if self._due and (self._asking is None or self._asking.done()):
            self._asking = asyncio.create_task(self._ask_after_grace())

    async def _ask_after_grace(self) -> None:
        await asyncio.sleep(GAP_GRACE_S)
        due, self._due = self._due, {}
        streams = []
        for request_id, why in due.items():
            stream = self._streams.get(request_id)
            if stream is None or (why == "gap" and not stream.has_gap):
                continue  # closed, or the late chunk came
            streams.append(stream)
            if self._replays is not None:
                self._replays.labels(why).inc()
        await self.replay(streams)

    async def replay(self, streams: list[TokenStream], cause: str | None = None) -> None:
        """Ask every producer for what these streams lack; answers arrive as batches.
        `cause` counts them in duet_ingress_token_replays_total."""
        if cause is not None and self._replays is not None and streams:
            self._replays.labels(cause).inc(len(streams))
        for start in range(0, len(streams), MAX_QUERY_REQUESTS):
            part = streams[start : start + MAX_QUERY_REQUESTS]
            wanted = tuple(ReplayFrom(s.request_id, s.next_index) for s in part)
            query = codec.encode(ReplayQuery(self.stream, wanted))
            try:
                await self.bus.publish(subjects.TOKENS_REPLAY, query)
            except (nats.errors.Error, BusError, OSError) as err:
                logger.warning("could not ask for %d stream(s) again: %r", len(part), err)
