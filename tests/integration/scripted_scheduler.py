"""A stand-in for the scheduler in ingress tests: a real NATS subscriber on the unit's submit
subject that accepts (or refuses) each request, plays back a script of TokenChunks on the
request's token stream (through a real TokenOutbox, one batch per chunk, some of them lost if
the script says so), answers status queries (as `knows` says) and replay queries (the outbox),
and records the submits, the status queries and the CancelRequests it receives."""

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.common.token_outbox import TokenOutbox
from duetserve.proto import codec, subjects
from duetserve.proto.common import ErrorReply
from duetserve.proto.scheduling import (
    CancelRequest,
    RequestStatus,
    RequestStatusQuery,
    SchedulerStats,
    SubmitAccepted,
    SubmitRequest,
)
from duetserve.proto.tokens import FinishReason, TokenBatch, TokenChunk, TokenLogprob, TopLogprob


@dataclass(frozen=True)
class Script:
    """What the scripted scheduler plays for every request it accepts."""

    token_ids: tuple[int, ...]
    chunk_size: int = 1
    finish: FinishReason | None = FinishReason.LENGTH  # None: never finishes (wait for cancel)
    error: str | None = None  # an ERROR chunk after the tokens
    out_of_order: bool = True  # publish chunk pairs swapped
    cached_tokens: int = 3
    delay_s: float = 0.0
    logprobs: bool = False
    refuse: ErrorReply | None = None
    accept_delay_s: float = 0.0  # before answering a submit
    lose: frozenset[int] = frozenset()  # chunks (by play order) whose batch is lost on its way

    def chunks(self, request_id: str) -> list[TokenChunk]:
        groups = [
            self.token_ids[i : i + self.chunk_size]
            for i in range(0, len(self.token_ids), self.chunk_size)
        ]
        chunks, index = [], 0
        for number, ids in enumerate(groups):
            last = number == len(groups) - 1 and self.error is None
            chunks.append(
                TokenChunk(
                    request_id,
                    index,
                    ids,
                    tuple(_logprob(t) for t in ids) if self.logprobs else (),
                    finish_reason=self.finish if last else None,
                    cached_tokens=self.cached_tokens if index == 0 else None,
                )
            )
            index += len(ids)
        if self.error is not None:
            chunks.append(TokenChunk(request_id, index, (), (), FinishReason.ERROR, self.error))
        if self.out_of_order:
            for i in range(0, len(chunks) - 1, 2):
                chunks[i], chunks[i + 1] = chunks[i + 1], chunks[i]
        return chunks


def _logprob(token_id: int) -> TokenLogprob:
    return TokenLogprob(token_id, -0.5, (TopLogprob(token_id, -0.5), TopLogprob(7, -1.5)))


class LossyOutbox(TokenOutbox):
    """A TokenOutbox whose chosen batches never reach NATS, as if published while NATS was
    away: kept for replay, their numbers used, nothing sent."""

    def __init__(self, bus: Bus, instance: str) -> None:
        super().__init__(bus, instance)
        self.drop_next = False

    async def _publish(self, stream: str, batch: TokenBatch) -> None:
        if self.drop_next and batch.seq:
            self.drop_next = False
            self.publish_failures += 1
            return
        await super()._publish(stream, batch)


class ScriptedScheduler:
    def __init__(self, bus: Bus, script: Script, unit: str = subjects.DEFAULT_UNIT) -> None:
        self.bus, self.unit = bus, unit
        self.script = script
        self.submits: list[SubmitRequest] = []
        self.traceparents: list[str | None] = []
        self.cancels: asyncio.Queue[CancelRequest] = asyncio.Queue()
        self.status_queries: list[RequestStatusQuery] = []
        # Status answers: True, every request it accepted and was not cancelled is known;
        # False, none is (a scheduler that restarted); None, no answer at all.
        self.knows: bool | None = True
        self.stats: SchedulerStats | None = None  # its answer to a stats query (None: none)
        self._players: set[asyncio.Task[None]] = set()
        self.outbox = LossyOutbox(bus, "scripted-scheduler")

    async def start(self) -> None:
        await self.outbox.start()
        await self.bus.subscribe(subjects.sched(self.unit, "submit"), self._on_submit)
        await self.bus.subscribe(subjects.sched(self.unit, "cancel"), self._on_cancel)
        await self.bus.subscribe(subjects.sched(self.unit, "status"), self._on_status)
        await self.bus.subscribe(subjects.sched(self.unit, "stats"), self._on_stats)
        await self.bus.flush()

    async def _on_stats(self, msg: Msg) -> None:
        if self.stats is not None:
            await self.bus.reply(msg, codec.encode(self.stats))

    async def _on_status(self, msg: Msg) -> None:
        query = codec.decode(msg.data, RequestStatusQuery)
        self.status_queries.append(query)
        if self.knows is None:
            return
        accepted = {s.request_id for s in self.submits}
        known = tuple(r for r in query.request_ids if r in accepted) if self.knows else ()
        await self.bus.reply(msg, codec.encode(RequestStatus("scripted", known)))

    async def _on_submit(self, msg: Msg) -> None:
        submit = codec.decode(msg.data, SubmitRequest)
        self.submits.append(submit)
        self.traceparents.append((msg.headers or {}).get("traceparent"))
        await asyncio.sleep(self.script.accept_delay_s)
        if self.script.refuse is not None:
            await self.bus.reply(msg, codec.encode(self.script.refuse))
            return
        await self.bus.reply(msg, codec.encode(SubmitAccepted(submit.request_id)))
        player = asyncio.create_task(self._play(submit.request_id, submit.stream))
        self._players.add(player)
        player.add_done_callback(self._players.discard)

    async def _play(self, request_id: str, stream: str) -> None:
        await self.bus.publish(subjects.tokens(stream), b"\x93not a batch")  # logged, dropped
        for number, chunk in enumerate(self.script.chunks(request_id)):
            await asyncio.sleep(self.script.delay_s)
            self.outbox.drop_next = number in self.script.lose
            await self.outbox.send(stream, chunk)

    async def _on_cancel(self, msg: Msg) -> None:
        self.cancels.put_nowait(codec.decode(msg.data, CancelRequest))

    async def next_cancel(self, timeout: float = 3.0) -> CancelRequest:
        return await asyncio.wait_for(self.cancels.get(), timeout)

    def stop(self) -> None:
        for player in self._players:
            player.cancel()


class FakeCore:
    """A stand-in for a scheduler's core where a unit's card is written from it
    (scheduler/card.py): its queue, running requests, limit and block size, set by the test."""

    def __init__(self, waiting: int, running: int, limit: int) -> None:
        self.waiting, self.running, self.limit = waiting, running, limit

    @property
    def view(self) -> Any:
        return SimpleNamespace(
            waiting=[0] * self.waiting,
            prefilling=[],
            decoding=[0] * self.running,
            free_blocks=10,
            total_blocks=100,
        )

    @property
    def planner(self) -> Any:
        return SimpleNamespace(max_running=self.limit, config=SimpleNamespace(block_size=4))
