"""The semantic response cache: whole answers reused for questions that mean the same, under
rules that keep a wrong answer from being served cheaply.

A hit needs all of:
- the same tenant: every tenant has a namespace of its own (its own HNSW index, its own
  entries), so one tenant's lookup never sees another's vectors (a hard namespace, not a salt);
- the same model and the same context (`context_key`, from ingress: the earlier turns, the
  system prompt and the sampling settings that change answers; services/ingress/semantic.py);
- cosine similarity at least the threshold of the asking query's category at the current load
  (semantic_categories.py), and the entry still within that category's TTL at that load;
- no veto (semantic_vetoes.py): differing numbers, a negation, another named entity, a contrast
  word or the same wording with a changed word;
- an answer no longer than the asker's max_tokens (a shorter budget would have cut it).

Candidates are found by an HNSW index (hnswlib: chosen by measurement, docs/benchmarks.md) over
the tenant's vectors; a context with few entries (a conversation's) is searched exactly
instead, which is both faster and never misses one. Answers, vectors and times live in the store
(semantic_store.py), which a restart rebuilds the indexes from. Each tenant holds at most a
category's quota of entries in it, the least recently used going first; `sweep` drops entries
older than any TTL their category can reach.

Not thread-safe: one thread owns a cache (semantic_service.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import hnswlib
import numpy as np

from duetserve.services.cache_index.semantic_categories import Categories, CategoryPolicy
from duetserve.services.cache_index.semantic_store import AnswerStore, StoredAnswer
from duetserve.services.cache_index.semantic_vetoes import QueryFeatures, Veto, features, vetoes

Clock = Callable[[], float]

# HNSW parameters: those of vLLM's semantic-router, which our measurement (ann_bench) confirmed
# reach full recall at 10k vectors; efSearch is raised to `candidates` when that is larger.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 50
# A context with at most this many entries is searched exactly (a dot product over them).
EXACT_SEARCH_MAX = 256
_INITIAL_CAPACITY = 256


class MissReason(StrEnum):
    EMPTY = "empty"  # nothing cached for this tenant, model and context
    BELOW_THRESHOLD = "below_threshold"
    EXPIRED = "expired"
    VETOED = "vetoed"
    TOO_LONG = "too_long"  # the cached answer is longer than the asker's max_tokens


@dataclass(frozen=True, slots=True)
class Ask:
    """One lookup: who asks, in which context, what, and how loaded the model is."""

    tenant: str
    model: str
    context_key: str
    query: str
    max_tokens: int
    load: float = 0.0  # [0, 1]: the asked model's load (loosens thresholds, lengthens TTLs)


@dataclass(frozen=True, slots=True)
class Hit:
    answer: StoredAnswer
    category: str
    similarity: float
    threshold: float


@dataclass(frozen=True, slots=True)
class Miss:
    reason: MissReason
    category: str
    similarity: float = 0.0  # of the nearest candidate in the same context, if any
    threshold: float = 0.0
    vetoes: tuple[Veto, ...] = ()


@dataclass(slots=True)
class _Entry:
    stored: StoredAnswer
    features: QueryFeatures


@dataclass(slots=True)
class _Namespace:
    """One tenant's entries: an HNSW index over all of them, and who is where."""

    index: hnswlib.Index
    entries: dict[int, _Entry] = field(default_factory=dict)
    by_context: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    lru: dict[str, OrderedDict[int, None]] = field(default_factory=dict)  # per category


class SemanticCache:
    def __init__(
        self,
        categories: Categories,
        store: AnswerStore,
        dim: int,
        clock: Clock = time.time,
        candidates: int = 8,
    ) -> None:
        missing = [name for name in categories.names if name not in categories.policies]
        if missing:
            raise ValueError(f"categories without a cache policy: {', '.join(missing)}")
        self.categories = categories
        self.store = store
        self.dim = dim
        self.clock = clock  # wall clock: entries outlive the process (the store)
        self.candidates = candidates
        self._namespaces: dict[str, _Namespace] = {}

    # ---- lookup -------------------------------------------------------------------------

    def lookup(self, ask: Ask, vector: np.ndarray) -> Hit | Miss:
        vector = _unit(vector)
        category = self.categories.assign(vector)
        policy = self.categories.policy(category)
        threshold = policy.threshold(ask.load)
        ns = self._namespaces.get(ask.tenant)
        if ns is None:
            return Miss(MissReason.EMPTY, category, threshold=threshold)
        found = self._nearest(ns, (ask.model, ask.context_key), vector)
        if not found:
            return Miss(MissReason.EMPTY, category, threshold=threshold)
        now = self.clock()
        ttl = policy.ttl(ask.load)
        mine = features(ask.query)
        reason, best = MissReason.BELOW_THRESHOLD, found[0][1]
        why: tuple[Veto, ...] = ()
        for entry_id, similarity in found:
            if similarity < threshold:
                break
            entry = ns.entries[entry_id]
            stored = entry.stored
            if now >= stored.created + ttl:
                reason = MissReason.EXPIRED
                continue
            if stored.completion_tokens > ask.max_tokens:
                reason = MissReason.TOO_LONG
                continue
            vetoed = vetoes(mine, entry.features)
            if vetoed:
                reason, why = MissReason.VETOED, tuple(vetoed)
                continue
            self._use(ns, entry, now)
            return Hit(stored, category, similarity, threshold)
        return Miss(reason, category, best, threshold, why)

    def _nearest(
        self, ns: _Namespace, context: tuple[str, str], vector: np.ndarray
    ) -> list[tuple[int, float]]:
        """(entry id, cosine) of the closest entries in `context`, closest first."""
        ids = ns.by_context.get(context)
        if not ids:
            return []
        if len(ids) <= EXACT_SEARCH_MAX:
            order = list(ids)
            matrix = np.stack([ns.entries[i].stored.vector for i in order])
            sims = matrix @ vector
            top = np.argsort(-sims)[: self.candidates]
            return [(order[i], float(sims[i])) for i in top]
        k = min(self.candidates, len(ids))
        ns.index.set_ef(max(HNSW_EF_SEARCH, k))
        try:
            labels, distances = ns.index.knn_query(vector, k=k, filter=lambda label: label in ids)
        except RuntimeError:  # the graph walk found fewer than k in this context
            try:
                labels, distances = ns.index.knn_query(vector, k=1, filter=lambda lb: lb in ids)
            except RuntimeError:
                return []
        # Inner-product space: distance = 1 - cosine for unit vectors.
        return [(int(lb), 1.0 - float(d)) for lb, d in zip(labels[0], distances[0], strict=True)]

    def _use(self, ns: _Namespace, entry: _Entry, now: float) -> None:
        entry.stored.last_used = now
        ns.lru[entry.stored.category].move_to_end(entry.stored.id)
        self.store.touch(entry.stored.id, now)

    # ---- insert, sweep, restore ---------------------------------------------------------

    def insert(
        self,
        *,
        tenant: str,
        model: str,
        context_key: str,
        query: str,
        answer: str,
        completion_tokens: int,
        finish_reason: str,
        vector: np.ndarray,
    ) -> StoredAnswer:
        """Cache an answer (the caller checked that it finished normally). The same query asked
        again in the same context replaces the older answer."""
        vector = _unit(vector)
        now = self.clock()
        ns = self._namespace(tenant)
        context = (model, context_key)
        for entry_id in list(ns.by_context.get(context, ())):
            if ns.entries[entry_id].stored.query == query:
                self._remove(ns, entry_id)
        stored = StoredAnswer(
            tenant=tenant,
            model=model,
            context_key=context_key,
            category=self.categories.assign(vector),
            query=query,
            answer=answer,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
            created=now,
            last_used=now,
            vector=vector,
        )
        self.store.add(stored)
        self._index(ns, [stored])
        return stored

    def sweep(self) -> int:
        """Drop every entry past the longest TTL its category can reach; how many went."""
        now = self.clock()
        gone = 0
        for ns in self._namespaces.values():
            old = [
                entry_id
                for entry_id, entry in ns.entries.items()
                if now >= entry.stored.created + self._policy(entry.stored).ttl_max_s
            ]
            for entry_id in old:
                self._remove(ns, entry_id)
            gone += len(old)
        return gone

    def restore(self) -> int:
        """Index what the store holds (at start): entries still within reach of their TTL,
        each tenant's categories held to their quotas. How many were indexed."""
        now = self.clock()
        by_tenant: dict[str, list[StoredAnswer]] = {}
        stale: list[StoredAnswer] = []
        for stored in self.store.all():
            if len(stored.vector) != self.dim:
                stale.append(stored)  # another embedding model's vector
                continue
            if stored.category not in self.categories.policies:
                stored.category = self.categories.assign(stored.vector)  # the file changed
            if now >= stored.created + self._policy(stored).ttl_max_s:
                stale.append(stored)
                continue
            by_tenant.setdefault(stored.tenant, []).append(stored)
        self.store.remove(stale)
        for tenant, answers in by_tenant.items():
            answers.sort(key=lambda s: s.last_used)  # least recently used first in each LRU
            self._index(self._namespace(tenant), answers)
        return sum(len(ns.entries) for ns in self._namespaces.values())

    def adopt(self, stored: StoredAnswer) -> bool:
        """Index an answer another instance stored (a shared store: semantic_jetstream.py);
        False when it is known already, of another embedding model or past any TTL."""
        if len(stored.vector) != self.dim:
            return False
        if stored.category not in self.categories.policies:
            stored.category = self.categories.assign(stored.vector)
        ns = self._namespace(stored.tenant)
        if stored.id in ns.entries:
            return False
        if self.clock() >= stored.created + self._policy(stored).ttl_max_s:
            return False
        stored.vector = _unit(stored.vector)
        self._index(ns, [stored])
        return True

    def forget(self, tenant: str, entry_id: int) -> bool:
        """Drop an entry another instance removed (or the store expired); False if unknown."""
        ns = self._namespaces.get(tenant)
        if ns is None or entry_id not in ns.entries:
            return False
        self._remove(ns, entry_id, from_store=False)
        return True

    def size(self, tenant: str | None = None) -> int:
        if tenant is not None:
            ns = self._namespaces.get(tenant)
            return 0 if ns is None else len(ns.entries)
        return sum(len(ns.entries) for ns in self._namespaces.values())

    def category_size(self, tenant: str, category: str) -> int:
        ns = self._namespaces.get(tenant)
        return 0 if ns is None else len(ns.lru.get(category, ()))

    # ---- internals ----------------------------------------------------------------------

    def _policy(self, stored: StoredAnswer) -> CategoryPolicy:
        return self.categories.policy(stored.category)

    def _namespace(self, tenant: str) -> _Namespace:
        ns = self._namespaces.get(tenant)
        if ns is None:
            index = hnswlib.Index(space="ip", dim=self.dim)
            index.init_index(
                max_elements=_INITIAL_CAPACITY,
                ef_construction=HNSW_EF_CONSTRUCTION,
                M=HNSW_M,
                allow_replace_deleted=True,
            )
            index.set_ef(HNSW_EF_SEARCH)
            ns = self._namespaces[tenant] = _Namespace(index)
        return ns

    def _index(self, ns: _Namespace, answers: list[StoredAnswer]) -> None:
        if not answers:
            return
        needed = len(ns.entries) + len(answers)
        capacity = ns.index.get_max_elements()
        if needed > capacity:
            while capacity < needed:
                capacity *= 2
            ns.index.resize_index(capacity)
        vectors = np.stack([s.vector for s in answers])
        ids = np.array([s.id for s in answers], dtype=np.int64)
        ns.index.add_items(vectors, ids, num_threads=1, replace_deleted=True)
        for stored in answers:
            ns.entries[stored.id] = _Entry(stored, features(stored.query))
            ns.by_context.setdefault((stored.model, stored.context_key), set()).add(stored.id)
            lru = ns.lru.setdefault(stored.category, OrderedDict())
            lru[stored.id] = None
            quota = self._policy(stored).quota
            while len(lru) > quota:
                oldest = next(iter(lru))
                self._remove(ns, oldest)

    def _remove(self, ns: _Namespace, entry_id: int, from_store: bool = True) -> None:
        entry = ns.entries.pop(entry_id)
        stored = entry.stored
        ns.index.mark_deleted(entry_id)
        context = (stored.model, stored.context_key)
        ids = ns.by_context[context]
        ids.discard(entry_id)
        if not ids:
            del ns.by_context[context]
        ns.lru[stored.category].pop(entry_id, None)
        if from_store:
            self.store.remove([stored])


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
