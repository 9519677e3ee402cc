"""cache_index's semantic cache service (cache_index/semantic_service.py) on a real nats-server
with the real embedding model: lookups and inserts over the bus, broken messages refused, a
flood shed, late lookups not embedded, long queries left out, and an insert after its own
lookup not embedded twice."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from duetserve.common.nats_bus import Bus
from duetserve.proto import codec, semantic, subjects
from duetserve.proto.common import ErrorReply
from duetserve.services.cache_index.semantic_service import (
    BUSY,
    LATE,
    QUERY_TOO_LONG,
    SemanticConfig,
    SemanticService,
)

QUESTION = "What is the capital of France?"
REWORDED = "Tell me the capital of France."


@contextlib.asynccontextmanager
async def serving(bus: Bus, **config: Any) -> AsyncIterator[SemanticService]:
    """The service answering both subjects, as cache_index subscribes it, until the block ends."""
    service = SemanticService(bus, SemanticConfig(**config))
    await service.start()
    subscriptions = [
        await bus.subscribe(subjects.SEMANTIC_LOOKUP, service.lookup),
        await bus.subscribe(subjects.SEMANTIC_INSERT, service.insert),
    ]
    await bus.flush()
    try:
        yield service
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()
        await service.stop()


@pytest.fixture
async def service(bus: Bus) -> AsyncIterator[SemanticService]:
    async with serving(bus) as running:
        yield running


async def lookup(bus: Bus, query: str, tenant: str = "t") -> object:
    ask = semantic.SemanticLookup(tenant, "m", "ctx", query, 64)
    reply = await bus.request(subjects.SEMANTIC_LOOKUP, codec.encode(ask), timeout=10)
    return codec.decode(reply.data, semantic.SemanticHit, semantic.SemanticMiss, ErrorReply)


async def insert(bus: Bus, query: str, answer: str, finish: str = "stop") -> None:
    entry = semantic.SemanticInsert("t", "m", "ctx", query, answer, 7, finish)
    await bus.publish(subjects.SEMANTIC_INSERT, codec.encode(entry))


async def until_hit(bus: Bus, query: str) -> semantic.SemanticHit:
    deadline = time.monotonic() + 10
    while True:
        found = await lookup(bus, query)
        if isinstance(found, semantic.SemanticHit):
            return found
        assert time.monotonic() < deadline, f"no hit: {found}"
        await asyncio.sleep(0.05)


async def test_an_inserted_answer_serves_a_reworded_lookup(
    bus: Bus, service: SemanticService
) -> None:
    missed = await lookup(bus, QUESTION)
    assert isinstance(missed, semantic.SemanticMiss) and missed.reason == "empty"
    assert missed.category == "factual"
    await insert(bus, QUESTION, "Paris.")
    hit = await until_hit(bus, REWORDED)
    assert hit.answer == "Paris." and hit.completion_tokens == 7 and hit.finish_reason == "stop"
    assert hit.similarity > 0.9
    other = await lookup(bus, REWORDED, tenant="someone-else")
    assert isinstance(other, semantic.SemanticMiss)


async def test_an_insert_after_its_own_lookup_is_not_embedded_again(
    bus: Bus, service: SemanticService
) -> None:
    calls: list[int] = []
    encode = service._encoder.encode

    def counted(texts: list[str]) -> Any:
        calls.append(len(texts))
        return encode(texts)

    service._encoder.encode = counted
    await lookup(bus, QUESTION)
    assert calls == [1]
    await insert(bus, QUESTION, "Paris.")
    await until_hit(bus, QUESTION)
    assert calls == [1]  # the insert and the later lookups used the lookup's embedding


async def test_broken_messages_are_refused_and_the_service_keeps_serving(
    bus: Bus, service: SemanticService
) -> None:
    for payload in (
        b"\x00 not msgpack",
        codec.encode(semantic.SemanticHit("x", 1, "stop", "", 1.0)),
        codec.encode(semantic.SemanticLookup("", "m", "ctx", "q", 8)),
        codec.encode(semantic.SemanticLookup("t", "m", "ctx", "q", 0)),
        codec.encode(semantic.SemanticLookup("t", "m", "ctx", "q", 8, load=float("nan"))),
    ):
        reply = await bus.request(subjects.SEMANTIC_LOOKUP, payload, timeout=10)
        assert isinstance(codec.decode(reply.data, ErrorReply), ErrorReply)
    await insert(bus, QUESTION, "cut short", finish="length")  # refused: never stored
    await bus.publish(subjects.SEMANTIC_INSERT, b"junk")
    await insert(bus, "Who wrote Hamlet?", "Shakespeare.")
    hit = await until_hit(bus, "Who wrote Hamlet?")
    assert hit.answer == "Shakespeare."
    assert isinstance(await lookup(bus, QUESTION), semantic.SemanticMiss)


async def test_a_query_longer_than_the_model_reads_is_left_out(
    bus: Bus, service: SemanticService
) -> None:
    long_query = "Please summarise this text: " + "word " * 400
    await insert(bus, long_query, "A summary.")
    missed = await lookup(bus, long_query)
    assert isinstance(missed, semantic.SemanticMiss) and missed.reason == QUERY_TOO_LONG
    assert service.cache is not None and service.cache.size() == 0


async def test_a_flood_is_shed_and_late_lookups_are_not_embedded(bus: Bus) -> None:
    async with serving(bus, max_pending=0):
        shed = await lookup(bus, QUESTION)
        assert isinstance(shed, semantic.SemanticMiss) and shed.reason == BUSY
    async with serving(bus, lookup_deadline_s=0.0):
        found = await lookup(bus, QUESTION)
        assert isinstance(found, semantic.SemanticMiss) and found.reason == LATE


async def test_each_sweep_logs_what_the_cache_did(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="duetserve.services.cache_index.semantic_service")
    async with serving(bus, sweep_interval_s=0.05):
        await insert(bus, QUESTION, "Paris.")
        await until_hit(bus, REWORDED)
        deadline = time.monotonic() + 10
        while not any(getattr(r, "hits", 0) >= 1 for r in caplog.records):
            assert time.monotonic() < deadline, "no sweep logged the hit"
            await asyncio.sleep(0.05)
    swept = [r for r in caplog.records if getattr(r, "hits", 0) >= 1][-1]
    assert swept.getMessage().startswith("semantic cache: 1 entries")
    assert swept.inserts == 1 and swept.shed == 0  # type: ignore[attr-defined]
