"""The producer's side of the token streams (proto/tokens.py): batching, numbering, replay.

    outbox = TokenOutbox(bus, instance)
    await outbox.start()                 # answers ReplayQuery from now on
    outbox.add(stream, chunk)            # ... every chunk of a step
    await outbox.flush()                 # one TokenBatch per stream

Every chunk added is also kept in a replay buffer, by request, until the request has been quiet
for `keep_s` or the buffer holds more than `max_chunks` (the least recently active requests
go first). A publish that fails (NATS gone, its outbound buffer full) is logged and counted,
never raised: the chunks stay in the buffer, the batch number moves on, and the ingress, seeing
the hole in the numbers or a quiet stream, asks for them again.
"""

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus, BusError
from duetserve.proto import codec, subjects
from duetserve.proto.tokens import ReplayFrom, ReplayQuery, TokenBatch, TokenChunk

logger = logging.getLogger(__name__)

KEEP_S = 60.0  # a request's chunks are kept this long after its last one
MAX_CHUNKS = 200_000  # at most this many chunks in the buffer (a few tens of MB)
MAX_BATCH_CHUNKS = 512  # a replay answer is cut into batches of at most this many chunks


@dataclass(slots=True)
class _Kept:
    stream: str
    chunks: list[TokenChunk] = field(default_factory=list)
    touched: float = 0.0


class ReplayBuffer:
    """Recent chunks by request, bounded in time and count (pure: no I/O)."""

    def __init__(
        self,
        keep_s: float = KEEP_S,
        max_chunks: int = MAX_CHUNKS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep_s, self.max_chunks, self.clock = keep_s, max_chunks, clock
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # least recently touched first
        self._count = 0

    def __len__(self) -> int:
        """Chunks held."""
        return self._count

    def keep(self, stream: str, chunk: TokenChunk) -> None:
        kept = self._kept.get(chunk.request_id)
        if kept is None or kept.stream != stream:
            if kept is not None:
                self._count -= len(kept.chunks)
            kept = self._kept[chunk.request_id] = _Kept(stream)
        kept.chunks.append(chunk)
        kept.touched = self.clock()
        self._kept.move_to_end(chunk.request_id)
        self._count += 1
        self._prune()

    def has(self, request_id: str) -> bool:
        return request_id in self._kept

    def since(self, stream: str, wanted: ReplayFrom) -> list[TokenChunk]:
        """The chunks of `wanted.request_id` on `stream` that carry anything from
        `wanted.index` on: tokens at or past it, the stream's end, an error, a migrating
        notice (those two end or redirect a stream whatever its index)."""
        self._prune()
        kept = self._kept.get(wanted.request_id)
        if kept is None or kept.stream != stream:
            return []
        return [c for c in kept.chunks if _reaches(c, wanted.index)]

    def _prune(self) -> None:
        horizon = self.clock() - self.keep_s
        while self._kept:
            request_id, oldest = next(iter(self._kept.items()))
            if oldest.touched >= horizon and self._count <= self.max_chunks:
                return
            del self._kept[request_id]
            self._count -= len(oldest.chunks)


def _reaches(chunk: TokenChunk, index: int) -> bool:
    if chunk.migrating or chunk.error is not None:
        return True
    return chunk.index + len(chunk.token_ids) > index or (
        chunk.index >= index and chunk.finish_reason is not None
    )


class TokenOutbox:
    def __init__(self, bus: Bus, instance: str, buffer: ReplayBuffer | None = None) -> None:
        self.bus = bus
        # Unique to this run: a restarted process numbers its batches from 1 again.
        self.producer = f"{instance}-{secrets.token_hex(4)}"
        self.buffer = buffer or ReplayBuffer()
        self._pending: dict[str, list[TokenChunk]] = {}
        self._seq: dict[str, int] = {}
        self.batches_sent = 0
        self.publish_failures = 0  # batches that could not be published (replayed on request)
        self.replays_answered = 0

    async def start(self) -> None:
        """Answer replay queries (every producer hears every query)."""
        await self.bus.subscribe(subjects.TOKENS_REPLAY, self._on_replay)

    def add(self, stream: str, chunk: TokenChunk) -> None:
        """Queue `chunk` for its stream's next batch, and keep it for replay."""
        self.buffer.keep(stream, chunk)
        self._pending.setdefault(stream, []).append(chunk)

    def remember(self, stream: str, chunk: TokenChunk) -> None:
        """Keep `chunk` for replay without sending it: tokens another process sent (those a
        decode worker is handed with a request), so that this one can send them again."""
        if not self.buffer.has(chunk.request_id):
            self.buffer.keep(stream, chunk)

    async def flush(self) -> None:
        """Publish what was added since the last flush: one batch per stream."""
        pending, self._pending = self._pending, {}
        for stream, chunks in pending.items():
            seq = self._seq[stream] = self._seq.get(stream, 0) + 1
            await self._publish(stream, TokenBatch(self.producer, seq, tuple(chunks)))

    async def send(self, stream: str, chunk: TokenChunk) -> None:
        """Add one chunk and flush."""
        self.add(stream, chunk)
        await self.flush()

    async def _publish(self, stream: str, batch: TokenBatch) -> None:
        try:
            await self.bus.publish(subjects.tokens(stream), codec.encode(batch))
        except (nats.errors.Error, BusError, OSError) as err:
            self.publish_failures += 1
            logger.warning(
                "could not publish %d token chunk(s) to %s (kept for replay): %r",
                len(batch.chunks),
                stream,
                err,
            )
        else:
            self.batches_sent += 1

    async def _on_replay(self, msg: Msg) -> None:
        try:
            query = codec.decode(msg.data, ReplayQuery)
            subjects.check_token(query.stream, "stream")
        except (codec.ProtoError, ValueError) as err:
            logger.warning("dropped a malformed replay query: %s", err)
            return
        chunks = [c for wanted in query.requests for c in self.buffer.since(query.stream, wanted)]
        if not chunks:
            return  # nothing of these here: another producer answers, or none can
        self.replays_answered += 1
        for part in _parts(chunks, MAX_BATCH_CHUNKS):
            await self._publish(query.stream, TokenBatch(self.producer, 0, tuple(part)))


def _parts(items: list[TokenChunk], size: int) -> Iterable[list[TokenChunk]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
