"""One request's token stream: TokenChunks from subjects.tokens(request_id), in index order.

The first token comes from a prefill worker and the rest from a decode worker, so chunks may
arrive out of order; they are buffered by index and handed out strictly in order. A chunk that
cannot be decoded, belongs to another request or repeats tokens already handed out is logged
and dropped. An ERROR chunk ends the stream at once, whatever its index: a failed request has
no more tokens to wait for.
"""

import asyncio
import contextlib
import logging
import time

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from duetserve.common.nats_bus import Bus
from duetserve.proto import codec, subjects
from duetserve.proto.tokens import FinishReason, TokenChunk

logger = logging.getLogger(__name__)


class ChunkOrderer:
    """Chunks in, the ones that continue the stream out, in order (pure; no I/O)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_index = 0
        self._pending: dict[int, TokenChunk] = {}

    def push(self, chunk: TokenChunk) -> list[TokenChunk]:
        """The chunks `chunk` makes deliverable: none, itself, or a buffered run after it."""
        if chunk.finish_reason == FinishReason.ERROR or chunk.migrating:
            return [chunk]
        if chunk.index < self.next_index:
            logger.warning(
                "dropped a repeated token chunk",
                extra={"request_id": self.request_id, "index": chunk.index},
            )
            return []
        self._pending[chunk.index] = chunk
        ready = []
        while (head := self._pending.pop(self.next_index, None)) is not None:
            ready.append(head)
            self.next_index += len(head.token_ids)
            if head.finish_reason is not None:
                break
        return ready


class TokenStream:
    """The subscription to one request's tokens. Open it before submitting the request."""

    def __init__(self, bus: Bus, request_id: str) -> None:
        self.request_id = request_id
        self._bus = bus
        self._orderer = ChunkOrderer(request_id)
        self._arrived: asyncio.Queue[TokenChunk] = asyncio.Queue()
        self._ready: list[TokenChunk] = []
        self._subscription: Subscription | None = None
        self.last_heard = time.monotonic()  # when a chunk last arrived (or the stream opened)

    async def open(self) -> None:
        subject = subjects.tokens(self.request_id)
        self._subscription = await self._bus.subscribe(subject, self._on_message)

    async def close(self) -> None:
        """Stop listening; safe twice, and after the connection is gone."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    async def next(self) -> TokenChunk:
        """The next chunk in index order, waiting for it as long as it takes."""
        while not self._ready:
            self._ready = self._orderer.push(await self._arrived.get())
        return self._ready.pop(0)

    def end_here(self, index: int, reason: FinishReason) -> None:
        """End the stream at `index` without the bus (its last chunk was lost)."""
        self._arrived.put_nowait(TokenChunk(self.request_id, index, (), finish_reason=reason))

    def interrupt(self, error: str) -> None:
        """End the stream here, without the bus: the next chunk is an ERROR saying `error`."""
        ending = TokenChunk(self.request_id, 0, (), finish_reason=FinishReason.ERROR, error=error)
        self._arrived.put_nowait(ending)

    async def _on_message(self, msg: Msg) -> None:
        try:
            chunk = codec.decode(msg.data, TokenChunk)
        except codec.ProtoError as err:
            logger.warning(
                "dropped a malformed token chunk",
                extra={"request_id": self.request_id, "error": str(err)},
            )
            return
        if chunk.request_id != self.request_id:
            logger.warning(
                "dropped a token chunk of another request",
                extra={"request_id": self.request_id, "chunk_request_id": chunk.request_id},
            )
            return
        self.last_heard = time.monotonic()
        self._arrived.put_nowait(chunk)
