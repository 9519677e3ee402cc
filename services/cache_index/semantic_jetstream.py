"""The semantic cache's answers in JetStream, for a cluster: one key-value bucket per category
(`duet-semantic-<category>`), whose TTL is the longest the category's entries can live (its
`ttl_max_s`), so the server drops what no load can make valid again.

Every cache_index of the cluster keeps its own in-memory HNSW indexes over all of the buckets'
entries: at start it reads them (`all`), then watches the buckets and hands each change made by
another instance (a new answer, a removal, an expiry) to its cache (`on_remote`), so an answer
generated behind one ingress serves a lookup answered by any cache_index. Which instance answers
a lookup does not matter; what each one evicts for its quotas is removed from the bucket for all.

Keys are `<tenant, hex>.<entry id, hex>`: the tenant is in the key, the bucket per category, so
a removal needs no lookup of where an entry lives. Entry ids are random 62-bit numbers (unique
across instances without coordination). Values are msgpack maps, the vector raw float32 bytes:
nothing is pickled. A hit's use time stays local (LRU order is each instance's own).

Writes are made from the cache's thread and run on the event loop without waiting (a lost
write costs a future miss, never a wrong answer); a malformed value in a bucket is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from nats.js.kv import KeyValue

from duetserve.common.nats_bus import Bus
from duetserve.proto import subjects
from duetserve.services.cache_index.semantic_categories import CategoryPolicy
from duetserve.services.cache_index.semantic_store import StoredAnswer

logger = logging.getLogger(__name__)
_DELETES = ("DEL", "PURGE")
bucket_name = subjects.semantic_bucket


@dataclass(frozen=True, slots=True)
class RemoteChange:
    """What another instance did to a bucket: `put` a new answer, or (put None) removed
    `entry_id` of `tenant` (or the server expired it)."""

    tenant: str
    entry_id: int
    put: StoredAnswer | None = None


def key_of(tenant: str, entry_id: int) -> str:
    return f"{tenant.encode().hex() or '00'}.{entry_id:x}"


def parse_key(key: str) -> tuple[str, int]:
    tenant_hex, _, id_hex = key.partition(".")
    tenant = "" if tenant_hex == "00" else bytes.fromhex(tenant_hex).decode()
    return tenant, int(id_hex, 16)


def encode_answer(stored: StoredAnswer) -> bytes:
    return msgpack.packb(
        {
            "tenant": stored.tenant,
            "model": stored.model,
            "context_key": stored.context_key,
            "category": stored.category,
            "query": stored.query,
            "answer": stored.answer,
            "completion_tokens": stored.completion_tokens,
            "finish_reason": stored.finish_reason,
            "created": stored.created,
            "vector": np.ascontiguousarray(stored.vector, dtype="<f4").tobytes(),
        },
        use_bin_type=True,
    )


def decode_answer(raw: bytes, entry_id: int) -> StoredAnswer:
    """ValueError for anything but a map of the right fields and types."""
    try:
        value = msgpack.unpackb(raw, raw=False)
    except Exception as err:
        raise ValueError(f"not msgpack: {err}") from None
    if not isinstance(value, dict):
        raise ValueError("not a map")
    try:
        text = {k: value[k] for k in ("tenant", "model", "context_key", "category", "query")}
        answer, finish, vector = value["answer"], value["finish_reason"], value["vector"]
        tokens, created = value["completion_tokens"], value["created"]
    except KeyError as err:
        raise ValueError(f"missing {err}") from None
    strings = [*text.values(), answer, finish]
    if not all(isinstance(s, str) for s in strings) or not isinstance(vector, bytes):
        raise ValueError("a field of the wrong type")
    if not isinstance(tokens, int) or not isinstance(created, int | float):
        raise ValueError("a field of the wrong type")
    if len(vector) % 4:
        raise ValueError("a vector of partial floats")
    return StoredAnswer(
        **text,
        answer=answer,
        completion_tokens=tokens,
        finish_reason=finish,
        created=float(created),
        last_used=float(created),
        vector=np.frombuffer(vector, dtype="<f4").astype(np.float32),
        id=entry_id,
    )


class JetStreamAnswers:
    """The store interface of semantic_store.SemanticStore over JetStream buckets; `open()`
    on the event loop first, `aclose()` there last."""

    def __init__(
        self,
        bus: Bus,
        policies: Mapping[str, CategoryPolicy],
        on_remote: Callable[[RemoteChange], None],
    ) -> None:
        self.bus = bus
        self.policies = dict(policies)
        self.on_remote = on_remote  # called on the event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buckets: dict[str, KeyValue] = {}
        self._initial: list[StoredAnswer] = []
        self._own: set[int] = set()  # ids this instance wrote: their echoes are not news
        self._watchers: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        for category, policy in self.policies.items():
            bucket = await self._bucket(category, policy.ttl_max_s)
            self._buckets[category] = bucket
            watcher = await bucket.watchall()
            async for entry in watcher:
                if entry is None:  # the end of what the bucket held
                    break
                stored = self._stored(entry)
                if stored is not None:
                    self._initial.append(stored)
            self._watchers.append(watcher)
            self._tasks.append(asyncio.create_task(self._follow(watcher), name="semantic-watch"))

    async def _bucket(self, category: str, ttl_s: float) -> KeyValue:
        return await self.bus.key_value(bucket_name(category), ttl_s)

    def _stored(self, entry: Any) -> StoredAnswer | None:
        if entry.operation in _DELETES or not entry.value:
            return None
        try:
            _, entry_id = parse_key(entry.key)
            return decode_answer(entry.value, entry_id)
        except ValueError as err:
            logger.warning("skipped a malformed semantic cache entry %s: %s", entry.key, err)
            return None

    async def _follow(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None:
                continue
            try:
                tenant, entry_id = parse_key(entry.key)
            except ValueError:
                continue
            if entry.operation in _DELETES:
                self.on_remote(RemoteChange(tenant, entry_id))
            elif entry_id not in self._own:
                stored = self._stored(entry)
                if stored is not None:
                    self.on_remote(RemoteChange(tenant, entry_id, stored))

    # ---- the store interface (called from the cache's thread) --------------------------

    def add(self, entry: StoredAnswer) -> int:
        entry.id = secrets.randbits(62) or 1
        self._own.add(entry.id)
        bucket = self._buckets[entry.category]
        self._submit(bucket.put(key_of(entry.tenant, entry.id), encode_answer(entry)))
        return entry.id

    def touch(self, entry_id: int, last_used: float) -> None:
        """Use times stay with each instance (its own LRU order)."""

    def remove(self, entries: list[StoredAnswer]) -> None:
        for entry in entries:
            bucket = self._buckets.get(entry.category)
            if bucket is not None:
                self._submit(bucket.delete(key_of(entry.tenant, entry.id)))

    def all(self) -> Iterator[StoredAnswer]:
        initial, self._initial = self._initial, []
        yield from initial

    def close(self) -> None:
        """See aclose (the watchers stop on the event loop)."""

    async def aclose(self) -> None:
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers, self._tasks = [], []

    def _submit(self, write: Any) -> None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(write, self._loop)
        future.add_done_callback(_log_failure)


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("a semantic cache write to JetStream failed: %s", future.exception())
