"""The semantic cache over JetStream (cache_index/semantic_jetstream.py) on a real nats-server:
two caches of one cluster share answers through the buckets (an answer one stores serves the
other's lookups; what one removes the other forgets), a new instance starts with what the
buckets hold, each bucket's TTL is its category's longest, and a malformed value is skipped."""

import asyncio
import time
import uuid
from collections.abc import Callable

import nats.js.errors
import numpy as np
import pytest
from nats.js.kv import KeyValue

from duetserve.common.nats_bus import Bus
from duetserve.services.cache_index.semantic_cache import Ask, Hit, Miss, SemanticCache
from duetserve.services.cache_index.semantic_categories import Categories, CategoryPolicy
from duetserve.services.cache_index.semantic_jetstream import (
    JetStreamAnswers,
    RemoteChange,
    bucket_name,
    key_of,
)
from duetserve.services.cache_index.semantic_store import StoredAnswer

DIM = 4


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


class Instance:
    """One cache_index's cache over the shared buckets, remote changes applied as they come
    (the service applies them on its cache thread; here on the loop, which is the same)."""

    def __init__(self, bus: Bus, categories: Categories) -> None:
        self.store = JetStreamAnswers(bus, categories.policies, self.apply)
        self.cache = SemanticCache(categories, self.store, DIM)

    def apply(self, change: RemoteChange) -> None:
        if change.put is not None:
            self.cache.adopt(change.put)
        else:
            self.cache.forget(change.tenant, change.entry_id)

    async def open(self) -> int:
        await self.store.open()
        return self.cache.restore()


def categories(suffix: str, ttl_max_s: float = 3600.0) -> Categories:
    """Categories named uniquely per test: each test gets buckets of its own."""
    names = (f"code{suffix}", f"chat{suffix}")
    policies = {
        name: CategoryPolicy(name, 0.9, 0.85, ttl_s=ttl_max_s / 2, ttl_max_s=ttl_max_s, quota=2)
        for name in names
    }
    return Categories(names, np.stack([axis(0), axis(1)]), policies)


def ask(query: str = "sort a list", tenant: str = "t1") -> Ask:
    return Ask(tenant, "m", "ctx", query, 100)


def put(
    instance: Instance, vector: np.ndarray, query: str = "sort a list", tenant: str = "t1"
) -> StoredAnswer:
    return instance.cache.insert(
        tenant=tenant,
        model="m",
        context_key="ctx",
        query=query,
        answer=f"answer to {query}",
        completion_tokens=3,
        finish_reason="stop",
        vector=vector,
    )


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.05)


async def landed(bucket: KeyValue, count: int) -> None:
    """Wait until the bucket holds `count` keys (writes go without waiting)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            if len(await bucket.keys()) == count:
                return
        except nats.js.errors.NoKeysError:
            pass
        assert time.monotonic() < deadline, "the writes did not land"
        await asyncio.sleep(0.05)


async def test_two_instances_share_answers_and_removals(bus: Bus) -> None:
    cats = categories(uuid.uuid4().hex[:8])
    a, b = Instance(bus, cats), Instance(bus, cats)
    try:
        assert await a.open() == 0 and await b.open() == 0
        stored = put(a, axis(0), tenant="tenant ü/1")  # any tenant name survives the key
        await until(lambda: b.cache.size("tenant ü/1") == 1)
        hit = b.cache.lookup(ask(tenant="tenant ü/1"), axis(0))
        assert isinstance(hit, Hit) and hit.answer.answer == "answer to sort a list"
        assert hit.answer.id == stored.id
        assert isinstance(b.cache.lookup(ask(tenant="t2"), axis(0)), Miss)  # still per tenant

        # a's quota (2 per category) pushes its oldest out of the bucket: b forgets it too.
        put(a, np.array([0.9, 0.0, 0.43589, 0.0], dtype=np.float32), "q1", "tenant ü/1")
        put(a, np.array([0.9, 0.0, 0.0, 0.43589], dtype=np.float32), "q2", "tenant ü/1")
        await until(lambda: b.cache.category_size("tenant ü/1", cats.names[0]) == 2)
        await until(lambda: isinstance(b.cache.lookup(ask(tenant="tenant ü/1"), axis(0)), Miss))

        # A new instance starts with what the buckets hold.
        c = Instance(bus, cats)
        try:
            assert await c.open() == 2
            found = c.cache.lookup(
                ask("q2", "tenant ü/1"), np.array([0.9, 0.0, 0.0, 0.43589], dtype=np.float32)
            )
            assert isinstance(found, Hit) and found.answer.answer == "answer to q2"
        finally:
            await c.store.aclose()
    finally:
        await a.store.aclose()
        await b.store.aclose()


async def test_each_bucket_lives_as_long_as_its_categorys_longest_ttl(bus: Bus) -> None:
    cats = categories(uuid.uuid4().hex[:8], ttl_max_s=1.5)
    a = Instance(bus, cats)
    try:
        await a.open()
        for name in cats.names:
            status = await (await bus.js.key_value(bucket_name(name))).status()
            assert status.ttl == pytest.approx(1.5)
        put(a, axis(0))
        bucket = await bus.js.key_value(bucket_name(cats.names[0]))
        await landed(bucket, 1)
        await asyncio.sleep(2.5)  # the server expires it
        fresh = Instance(bus, cats)
        try:
            assert await fresh.open() == 0
        finally:
            await fresh.store.aclose()
    finally:
        await a.store.aclose()


async def test_a_malformed_value_is_skipped(bus: Bus) -> None:
    cats = categories(uuid.uuid4().hex[:8])
    a = Instance(bus, cats)
    try:
        await a.open()
        put(a, axis(0))
        bucket = await bus.js.key_value(bucket_name(cats.names[0]))
        await landed(bucket, 1)
        await bucket.put(key_of("t1", 12345), b"\x93not what we write")
        await bucket.put(key_of("t1", 777), b"")
        fresh = Instance(bus, cats)
        try:
            assert await fresh.open() == 1  # the good one only
            assert isinstance(fresh.cache.lookup(ask(), axis(0)), Hit)
        finally:
            await fresh.store.aclose()
    finally:
        await a.store.aclose()
