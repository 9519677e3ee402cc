"""The semantic cache inside cache_index: SEMANTIC_LOOKUP (request/reply) and SEMANTIC_INSERT
(publish) from ingress, served by one thread of its own that owns the embedding model, the
cache and its store (semantic_cache.py, semantic_store.py).

Embedding is the cost of a lookup (all-MiniLM-L6-v2 in bfloat16, ~3 ms a short query on one
core), so it runs off the event loop, where the prefix index's matches keep being answered, and
in batches: the thread takes every job waiting when it wakes (up to `max_batch`) and embeds
their queries in one forward pass. Torch gets one thread (`threads`): cache_index shares the
machine with the workers. A query embedded for its lookup is not embedded again for its
insert (the embeddings of the latest RECENT_VECTORS queries are kept), and in a batch the
lookups, which someone waits for, go before the inserts.

A lookup nobody waits for any more (older than `lookup_deadline_s`, past ingress's timeout) is
answered as a miss without being embedded, and with more than `max_pending` jobs queued a new
lookup is a miss at once: under a flood the cache sheds its own work, never the requests'.
Queries longer than the embedding model reads (`max_query_tokens`) are neither looked up nor
cached: their embedding would not see all of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from nats.aio.msg import Msg

from duetserve.common.nats_bus import Bus
from duetserve.proto import semantic
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.services.cache_index.semantic_cache import Ask, Hit, SemanticCache
from duetserve.services.cache_index.semantic_categories import Categories
from duetserve.services.cache_index.semantic_jetstream import JetStreamAnswers, RemoteChange
from duetserve.services.cache_index.semantic_store import MEMORY, AnswerStore, SemanticStore

logger = logging.getLogger(__name__)

QUERY_TOO_LONG = "query_too_long"
BUSY = "busy"  # shed: too many jobs queued
LATE = "late"  # no one waits for this answer any more
RECENT_VECTORS = 4096  # the embeddings of the latest queries, kept for their inserts


@dataclass(frozen=True, slots=True)
class SemanticConfig:
    # sqlite: answers in `store`, this instance's own; jetstream: in one JetStream bucket per
    # category, shared by every cache_index of the cluster (semantic_jetstream.py).
    backend: Literal["sqlite", "jetstream"] = "sqlite"
    store: Path | None = None  # sqlite's file; None: in memory, lost with the process
    categories: Path | None = None  # None: the shipped semantic_categories.json
    model_dir: Path | None = None  # None: the bundled all-MiniLM-L6-v2
    dtype: str = "bfloat16"
    threads: int = 1
    max_batch: int = 32
    max_pending: int = 256
    max_query_tokens: int = 256
    lookup_deadline_s: float = 0.5
    sweep_interval_s: float = 60.0


@dataclass(slots=True)
class _Job:
    message: semantic.SemanticLookup | semantic.SemanticInsert
    queued: float
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = None  # set for lookups
    extra: dict[str, Any] = field(default_factory=dict)


_SWEEP = object()
_STOP = object()


class SemanticService:
    """Start with `await start()` (loads the model and the store, off the loop), then
    subscribe `lookup` and `insert`; `stop()` ends the thread and closes the store."""

    def __init__(self, bus: Bus, config: SemanticConfig) -> None:
        self.bus = bus
        self.config = config
        self.cache: SemanticCache | None = None
        self._encoder: Any = None
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._shared: JetStreamAnswers | None = None  # the jetstream backend, if it is used
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()  # query -> its embedding
        self.stats = {"hits": 0, "misses": 0, "inserts": 0, "shed": 0}

    async def start(self) -> None:
        categories = await asyncio.to_thread(self._load_model)
        store: AnswerStore
        if self.config.backend == "jetstream":
            self._shared = JetStreamAnswers(self.bus, categories.policies, self._remote)
            await self._shared.open()
            store = self._shared
        else:
            store = SemanticStore(self.config.store or MEMORY)
        await asyncio.to_thread(self._restore, categories, store)
        self._thread = threading.Thread(target=self._run, name="semantic-cache", daemon=True)
        self._thread.start()
        self._sweeper = asyncio.create_task(self._sweep_every(), name="semantic-sweep")

    def _load_model(self) -> Categories:
        import torch  # only a cache_index with the semantic cache on loads torch

        from duetserve.runtime.embedding import SentenceEncoder

        c = self.config
        torch.set_num_threads(c.threads)
        dtype = getattr(torch, c.dtype)
        encoder = SentenceEncoder(c.model_dir, max_tokens=c.max_query_tokens, dtype=dtype)
        encoder.encode(["warm up the embedding model"])
        self._encoder = encoder
        return Categories.load(encoder, c.categories)

    def _restore(self, categories: Categories, store: AnswerStore) -> None:
        cache = SemanticCache(categories, store, self._encoder.dim)
        restored = cache.restore()
        self.cache = cache
        where = "jetstream" if self._shared is not None else str(self.config.store or MEMORY)
        logger.info(
            "semantic cache ready",
            extra={"entries": restored, "store": where, "dtype": self.config.dtype},
        )

    def _remote(self, change: RemoteChange) -> None:
        """Another instance's change to the shared store: applied on the cache's thread."""
        self._jobs.put(change)

    # ---- subjects (on the event loop) ---------------------------------------------------

    async def lookup(self, msg: Msg) -> None:
        try:
            ask = decode(msg.data, semantic.SemanticLookup)
            _check_lookup(ask)
        except (ProtoError, ValueError) as err:
            code = err.code if isinstance(err, ProtoError) else "invalid_message"
            await self.bus.reply(msg, encode(ErrorReply(code, str(err))))
            return
        if self._jobs.qsize() >= self.config.max_pending:
            self.stats["shed"] += 1
            await self.bus.reply(msg, encode(semantic.SemanticMiss("", BUSY)))
            return
        loop = asyncio.get_running_loop()
        job = _Job(ask, time.monotonic(), loop, loop.create_future())
        self._jobs.put(job)
        assert job.future is not None
        answer = await job.future
        await self.bus.reply(msg, encode(answer))

    async def insert(self, msg: Msg) -> None:
        try:
            entry = decode(msg.data, semantic.SemanticInsert)
            _check_insert(entry)
        except (ProtoError, ValueError) as err:
            logger.warning("dropped a semantic insert: %s", err)
            return
        if self._jobs.qsize() >= self.config.max_pending:
            self.stats["shed"] += 1
            return
        self._jobs.put(_Job(entry, time.monotonic()))

    async def _sweep_every(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            self._jobs.put(_SWEEP)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._thread is not None:
            self._jobs.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._shared is not None:
            await self._shared.aclose()
            self._shared = None
        if self.cache is not None:
            self.cache.store.close()
            self.cache = None

    # ---- the cache's thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            batch = [first]
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            jobs = [job for job in batch if isinstance(job, _Job)]
            for change in batch:
                if isinstance(change, RemoteChange):
                    self._apply(change)
            try:
                self._serve(jobs)
            except Exception as err:  # never leave an asker waiting
                logger.exception("semantic cache batch failed")
                for job in jobs:
                    _answer(job, semantic.SemanticMiss("", f"error: {err}"[:200]))
            if any(job is _SWEEP for job in batch):
                assert self.cache is not None
                gone = self.cache.sweep()
                # What the cache did since start, once a sweep interval (ingress counts the
                # lookups it sent; only this side sees what was shed under a flood).
                logger.info(
                    "semantic cache: %d entries, %d past their TTL dropped",
                    self.cache.size(),
                    gone,
                    extra=self.stats,
                )
            if any(job is _STOP for job in batch):
                return

    def _apply(self, change: RemoteChange) -> None:
        assert self.cache is not None
        try:
            if change.put is not None:
                self.cache.adopt(change.put)
            else:
                self.cache.forget(change.tenant, change.entry_id)
        except Exception:
            logger.exception("could not apply a change from the shared store")

    def _serve(self, jobs: list[_Job]) -> None:
        cache, encoder = self.cache, self._encoder
        assert cache is not None and encoder is not None
        now = time.monotonic()
        live: list[_Job] = []
        for job in jobs:
            if job.future is not None and now - job.queued > self.config.lookup_deadline_s:
                _answer(job, semantic.SemanticMiss("", LATE))
            else:
                live.append(job)
        if not live:
            return
        # A query's vector depends on its text only: an insert after its own lookup (the usual
        # order: looked up, missed, generated) is not embedded again.
        texts = list(
            dict.fromkeys(
                job.message.query for job in live if job.message.query not in self._recent
            )
        )
        if texts:
            lengths = [len(ids) for ids in encoder.tokenize(texts)]
            readable = [t for t, n in zip(texts, lengths, strict=True) if n < encoder.max_tokens]
            if readable:
                vectors = encoder.encode(readable).float().numpy()
                for text, vector in zip(readable, vectors, strict=True):
                    self._recent[text] = vector
                while len(self._recent) > RECENT_VECTORS:
                    self._recent.popitem(last=False)
        # Lookups first: someone waits for them; an insert's answer was already sent.
        ordered = sorted(live, key=lambda job: job.future is None)
        for job in ordered:
            m = job.message
            vector = self._recent.get(m.query)
            if vector is None:  # longer than the embedding model reads
                if job.future is not None:
                    _answer(job, semantic.SemanticMiss("", QUERY_TOO_LONG))
                continue
            self._recent.move_to_end(m.query)
            if isinstance(m, semantic.SemanticInsert):
                cache.insert(
                    tenant=m.tenant,
                    model=m.model,
                    context_key=m.context_key,
                    query=m.query,
                    answer=m.answer,
                    completion_tokens=m.completion_tokens,
                    finish_reason=m.finish_reason,
                    vector=vector,
                )
                self.stats["inserts"] += 1
                continue
            found = cache.lookup(
                Ask(m.tenant, m.model, m.context_key, m.query, m.max_tokens, m.load), vector
            )
            if isinstance(found, Hit):
                self.stats["hits"] += 1
                stored = found.answer
                answer: Any = semantic.SemanticHit(
                    stored.answer,
                    stored.completion_tokens,
                    stored.finish_reason,
                    found.category,
                    found.similarity,
                )
            else:
                self.stats["misses"] += 1
                answer = semantic.SemanticMiss(found.category, found.reason.value, found.similarity)
            _answer(job, answer)


def _answer(job: _Job, answer: Any) -> None:
    if job.future is None or job.loop is None:
        return
    future = job.future

    def settle() -> None:
        if not future.done():  # the asker's handler may have been cancelled meanwhile
            future.set_result(answer)

    job.loop.call_soon_threadsafe(settle)


def _check_lookup(ask: semantic.SemanticLookup) -> None:
    if not ask.tenant or not ask.model:
        raise ValueError("tenant and model must not be empty")
    if ask.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not math.isfinite(ask.load):
        raise ValueError("load must be a finite number")
    if not ask.query.strip():
        raise ValueError("query must not be empty")


def _check_insert(entry: semantic.SemanticInsert) -> None:
    if not entry.tenant or not entry.model:
        raise ValueError("tenant and model must not be empty")
    if entry.finish_reason != "stop":
        raise ValueError(f"only answers that finished normally are cached: {entry.finish_reason!r}")
    if not entry.answer or entry.completion_tokens < 1:
        raise ValueError("an empty answer is not cached")
    if not entry.query.strip():
        raise ValueError("query must not be empty")
