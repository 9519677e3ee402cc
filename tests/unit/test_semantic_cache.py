"""The semantic cache's rules (cache_index/semantic_cache.py) on hand-built vectors: thresholds
and their load adaptation, TTL expiry, quotas, vetoes, context, tenant isolation, and a restart
that rebuilds the indexes from the SQLite store."""

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from duetserve.services.cache_index.semantic_cache import (
    EXACT_SEARCH_MAX,
    Ask,
    Hit,
    Miss,
    MissReason,
    SemanticCache,
)
from duetserve.services.cache_index.semantic_categories import Categories, CategoryPolicy
from duetserve.services.cache_index.semantic_store import SemanticStore
from duetserve.services.cache_index.semantic_vetoes import Veto

DIM = 8
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def at_cosine(base: np.ndarray, other: np.ndarray, cosine: float) -> np.ndarray:
    """A unit vector at exactly `cosine` from unit `base`, towards unit `other` (orthogonal)."""
    return cosine * base + np.sqrt(1 - cosine**2) * other


# Two categories: "code" around axis 0 (strict), "chat" around axis 1 (looser).
CODE = CategoryPolicy("code", 0.95, 0.90, ttl_s=100.0, ttl_max_s=300.0, quota=3)
CHAT = CategoryPolicy("chat", 0.85, 0.80, ttl_s=DAY, ttl_max_s=2 * DAY, quota=100)


def categories() -> Categories:
    return Categories(("code", "chat"), np.stack([axis(0), axis(1)]), {"code": CODE, "chat": CHAT})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> SemanticCache:
    return SemanticCache(categories(), SemanticStore(), DIM, clock=clock)


def put(cache: SemanticCache, vector: np.ndarray, query: str = "sort a list", **kw: object):
    fields = {
        "tenant": "t1",
        "model": "m",
        "context_key": "ctx",
        "query": query,
        "answer": f"answer to {query}",
        "completion_tokens": 5,
        "finish_reason": "stop",
    }
    fields.update(kw)
    return cache.insert(vector=vector, **fields)  # type: ignore[arg-type]


def ask(query: str = "sort a list", **kw: object) -> Ask:
    fields: dict[str, object] = {
        "tenant": "t1",
        "model": "m",
        "context_key": "ctx",
        "query": query,
        "max_tokens": 100,
        "load": 0.0,
    }
    fields.update(kw)
    return Ask(**fields)  # type: ignore[arg-type]


def test_a_hit_needs_the_threshold_of_the_askers_category(cache: SemanticCache) -> None:
    put(cache, axis(0), query="sort a list")
    near = at_cosine(axis(0), axis(2), 0.96)  # code: strict threshold 0.95
    hit = cache.lookup(ask("order a list"), near)
    assert isinstance(hit, Hit)
    assert hit.answer.answer == "answer to sort a list"
    assert hit.category == "code"
    assert hit.similarity == pytest.approx(0.96, abs=1e-5)
    below = at_cosine(axis(0), axis(2), 0.93)
    miss = cache.lookup(ask("order a list"), below)
    assert isinstance(miss, Miss)
    assert miss.reason == MissReason.BELOW_THRESHOLD
    assert miss.similarity == pytest.approx(0.93, abs=1e-5)
    assert miss.threshold == pytest.approx(0.95)


def test_load_loosens_the_threshold_within_its_bound(cache: SemanticCache) -> None:
    put(cache, axis(0))
    probe = at_cosine(axis(0), axis(2), 0.93)
    assert isinstance(cache.lookup(ask("order a list", load=0.0), probe), Miss)
    # At load 0.5 the code threshold is 0.925; at full load 0.90, and no further.
    assert isinstance(cache.lookup(ask("order a list", load=0.5), probe), Hit)
    further = at_cosine(axis(0), axis(2), 0.89)
    for load in (1.0, 5.0):
        miss = cache.lookup(ask("order a list", load=load), further)
        assert isinstance(miss, Miss) and miss.threshold == pytest.approx(0.90)


def test_entries_expire_after_the_ttl_that_load_lengthens(
    cache: SemanticCache, clock: Clock
) -> None:
    put(cache, axis(0))
    clock.now += 99.0
    assert isinstance(cache.lookup(ask(), axis(0)), Hit)
    clock.now += 2.0  # 101 s old: past code's idle TTL (100 s) ...
    miss = cache.lookup(ask(), axis(0))
    assert isinstance(miss, Miss) and miss.reason == MissReason.EXPIRED
    # ... but within its TTL at full load (300 s)
    assert isinstance(cache.lookup(ask(load=1.0), axis(0)), Hit)
    clock.now += 200.0  # 301 s: past any TTL code can reach; the sweep drops it
    assert cache.sweep() == 1
    assert cache.size() == 0
    assert cache.store.count() == 0


def test_a_quota_keeps_the_most_recently_used_per_tenant_and_category(
    cache: SemanticCache, clock: Clock
) -> None:
    first = put(cache, axis(0), query="q0")
    clock.now += 1
    put(cache, at_cosine(axis(0), axis(2), 0.5), query="q1")
    clock.now += 1
    put(cache, at_cosine(axis(0), axis(3), 0.5), query="q2")
    clock.now += 1
    assert isinstance(cache.lookup(ask("q0"), axis(0)), Hit)  # q0 used: now the most recent
    put(cache, at_cosine(axis(0), axis(4), 0.5), query="q3")  # over code's quota of 3
    assert cache.category_size("t1", "code") == 3
    assert isinstance(cache.lookup(ask("q0"), first.vector), Hit)
    q1 = cache.lookup(ask("q1"), at_cosine(axis(0), axis(2), 0.5))
    assert isinstance(q1, Miss)  # q1 was least recently used: it went
    # The quota is per tenant: another tenant's entries do not count against t1's.
    put(cache, axis(0), tenant="t2")
    assert cache.category_size("t1", "code") == 3
    assert cache.category_size("t2", "code") == 1
    # ... and per category: chat entries do not evict code ones.
    for i in range(5):
        put(cache, at_cosine(axis(1), axis(5), 0.9 + i / 100), query=f"chat {i}")
    assert cache.category_size("t1", "code") == 3
    assert cache.category_size("t1", "chat") == 5


@pytest.mark.parametrize(
    ("cached", "asked", "veto"),
    [
        ("top 10 rows of a dataframe", "top 20 rows of a dataframe", Veto.NUMBERS),
        ("export a csv with the index", "export a csv without the index", Veto.NEGATION),
        ("weather in Paris today", "weather in Lyon today", Veto.ENTITIES),
        ("sort a list ascending", "sort a list descending", Veto.CONTRAST),
    ],
)
def test_each_veto_refuses_a_hit_above_the_threshold(
    cache: SemanticCache, cached: str, asked: str, veto: Veto
) -> None:
    put(cache, axis(0), query=cached)
    miss = cache.lookup(ask(asked), axis(0))  # identical vectors: only the veto stops it
    assert isinstance(miss, Miss)
    assert miss.reason == MissReason.VETOED
    assert veto in miss.vetoes
    assert isinstance(cache.lookup(ask(cached), axis(0)), Hit)


def test_the_same_question_in_another_conversation_is_not_a_hit(cache: SemanticCache) -> None:
    put(cache, axis(0), query="and in python?", context_key="conversation-about-sorting")
    other = cache.lookup(ask("and in python?", context_key="conversation-about-http"), axis(0))
    assert isinstance(other, Miss) and other.reason == MissReason.EMPTY
    other_model = cache.lookup(
        ask("and in python?", context_key="conversation-about-sorting", model="m2"), axis(0)
    )
    assert isinstance(other_model, Miss) and other_model.reason == MissReason.EMPTY
    same = cache.lookup(ask("and in python?", context_key="conversation-about-sorting"), axis(0))
    assert isinstance(same, Hit)


def test_tenants_never_see_each_others_answers(cache: SemanticCache) -> None:
    put(cache, axis(0), tenant="a", answer="a's secret")
    miss = cache.lookup(ask(tenant="b"), axis(0))
    assert isinstance(miss, Miss) and miss.reason == MissReason.EMPTY
    put(cache, axis(0), tenant="b", answer="b's own")
    hit_b = cache.lookup(ask(tenant="b"), axis(0))
    hit_a = cache.lookup(ask(tenant="a"), axis(0))
    assert isinstance(hit_b, Hit) and hit_b.answer.answer == "b's own"
    assert isinstance(hit_a, Hit) and hit_a.answer.answer == "a's secret"


def test_an_answer_longer_than_max_tokens_is_not_served(cache: SemanticCache) -> None:
    put(cache, axis(0), completion_tokens=50)
    miss = cache.lookup(ask(max_tokens=49), axis(0))
    assert isinstance(miss, Miss) and miss.reason == MissReason.TOO_LONG
    assert isinstance(cache.lookup(ask(max_tokens=50), axis(0)), Hit)


def test_the_same_query_again_replaces_its_answer(cache: SemanticCache) -> None:
    put(cache, axis(0), answer="old")
    put(cache, axis(0), answer="new")
    assert cache.size() == 1
    hit = cache.lookup(ask(), axis(0))
    assert isinstance(hit, Hit) and hit.answer.answer == "new"


def test_a_large_context_is_searched_through_the_hnsw_index(clock: Clock) -> None:
    roomy = {
        name: CategoryPolicy(name, 0.95, 0.90, ttl_s=100.0, ttl_max_s=300.0, quota=10_000)
        for name in ("code", "chat")
    }
    cats = Categories(("code", "chat"), np.stack([axis(0), axis(1)]), roomy)
    cache = SemanticCache(cats, SemanticStore(), DIM, clock=clock)
    rng = np.random.default_rng(0)
    n = EXACT_SEARCH_MAX + 200
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i, v in enumerate(vectors):
        put(cache, v, query=f"query {i}", answer=f"answer {i}")
    put(cache, vectors[0], query="query 0", context_key="elsewhere", answer="elsewhere")
    for i in (3, 177, n - 1):
        hit = cache.lookup(ask(f"query {i}", load=1.0), vectors[i])
        assert isinstance(hit, Hit), i
        assert hit.answer.answer == f"answer {i}"
    # The filter keeps to the context, even where the other context holds the same vector.
    hit = cache.lookup(ask("query 0", context_key="elsewhere"), vectors[0])
    assert isinstance(hit, Hit) and hit.answer.answer == "elsewhere"


def test_a_restart_rebuilds_the_index_from_the_store(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "semantic.sqlite"
    cache = SemanticCache(categories(), SemanticStore(path), DIM, clock=clock)
    put(cache, axis(0), query="sort a list", answer="kept")
    put(cache, axis(1), query="hello there", answer="hi", tenant="t2")
    cache.store.close()
    clock.now += 150.0  # past code's idle TTL, within its longest: kept, served under load
    again = SemanticCache(categories(), SemanticStore(path), DIM, clock=clock)
    assert again.restore() == 2
    assert isinstance(again.lookup(ask(), axis(0)), Miss)
    hit = again.lookup(ask(load=1.0), axis(0))
    assert isinstance(hit, Hit) and hit.answer.answer == "kept"
    chat = again.lookup(ask("hello there", tenant="t2"), axis(1))
    assert isinstance(chat, Hit) and chat.answer.answer == "hi"
    again.store.close()
    clock.now += 200.0  # past code's longest TTL: a restart drops it from the store too
    third = SemanticCache(categories(), SemanticStore(path), DIM, clock=clock)
    assert third.restore() == 1
    assert third.store.count() == 1
    third.store.close()


def test_the_store_holds_sql_values_and_raw_floats_only(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "semantic.sqlite"
    cache = SemanticCache(categories(), SemanticStore(path), DIM, clock=clock)
    put(cache, axis(0), answer="plain text")
    cache.store.close()
    row = sqlite3.connect(path).execute("SELECT answer, vector FROM answers").fetchone()
    assert row[0] == "plain text"
    assert np.array_equal(np.frombuffer(row[1], dtype="<f4"), axis(0))
    assert not row[1].startswith(b"\x80")  # no pickle protocol header


def test_categories_without_a_policy_are_refused() -> None:
    cats = Categories(("code", "other"), np.stack([axis(0), axis(1)]), {"code": CODE})
    with pytest.raises(ValueError, match="other"):
        SemanticCache(cats, SemanticStore(), DIM)
