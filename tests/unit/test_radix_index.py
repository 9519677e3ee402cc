"""The prefix index of cache_index: matching, duplicates, tenant isolation, locks and LRU."""

import hashlib
import random
import struct
from dataclasses import dataclass

import pytest

from duetserve.common.block_hash import block_key, iter_block_keys
from duetserve.services.cache_index.radix import InsertResult, MatchResult, RadixIndex

BS = 4


def _tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_match_after_insert_returns_the_inserted_full_blocks() -> None:
    index = RadixIndex(BS)
    prompt = _tokens(100, 10)  # two full blocks and a partial one
    result = index.insert("a", prompt, [7, 8, 9], now=1.0)
    assert result == InsertResult(num_new=2, adopted=[7, 8], duplicates=[])
    assert index.match("a", prompt, now=2.0) == MatchResult([7, 8], 8)
    assert index.num_blocks == 2
    index.check_invariants()


def test_match_caps_at_the_last_full_block_before_the_final_token() -> None:
    index = RadixIndex(BS)
    prompt = _tokens(0, 8)
    index.insert("a", prompt, [1, 2], now=1.0)
    assert index.match("a", prompt, now=2.0).block_ids == [1]  # block 2 ends at the last token
    assert index.match("a", [*prompt, 99], now=3.0).block_ids == [1, 2]
    assert index.match("a", prompt[:7], now=4.0).block_ids == [1]
    assert index.match("a", prompt[:4], now=5.0).block_ids == []
    assert index.match("a", [], now=6.0) == MatchResult([], 0)
    assert index.match("a", [0, 1, 2, 3, 9, 9, 9, 9, 9], now=7.0).block_ids == [1]


def test_reinsert_reports_duplicates_and_keeps_the_first_copy() -> None:
    index = RadixIndex(BS)
    prompt = _tokens(0, 12)
    index.insert("a", prompt[:8], [1, 2], now=1.0)
    again = index.insert("a", prompt[:8], [3, 4], now=2.0)
    assert again == InsertResult(num_new=0, adopted=[], duplicates=[3, 4])
    longer = index.insert("a", prompt, [5, 6, 7], now=3.0)
    assert longer == InsertResult(num_new=1, adopted=[7], duplicates=[5, 6])
    own = index.insert("a", prompt, [1, 2, 7], now=4.0)  # the index's own blocks: neither list
    assert own == InsertResult(num_new=0, adopted=[], duplicates=[])
    assert index.match("a", [*prompt, 0], now=5.0).block_ids == [1, 2, 7]
    index.check_invariants()


def test_insert_rejects_bad_block_ids_and_leaves_the_index_unchanged() -> None:
    index = RadixIndex(BS)
    index.insert("a", _tokens(0, 4), [1], now=1.0)
    with pytest.raises(ValueError, match="already indexed"):
        index.insert("a", _tokens(50, 8), [2, 1], now=2.0)
    with pytest.raises(ValueError, match="two positions"):
        index.insert("a", _tokens(50, 8), [3, 3], now=2.0)
    with pytest.raises(ValueError, match="full blocks"):
        index.insert("a", _tokens(50, 8), [3], now=2.0)
    assert index.num_blocks == 1
    index.check_invariants()
    with pytest.raises(ValueError, match="backwards"):
        index.match("a", _tokens(0, 5), now=0.5)
    with pytest.raises(ValueError, match="public_prefix_tokens"):
        index.match("a", _tokens(0, 5), public_prefix_tokens=-1, now=3.0)
    with pytest.raises(ValueError, match="token ids"):
        index.match("a", [-1, 0, 0, 0, 0], now=3.0)


def test_a_tenants_private_prefix_is_never_matched_by_another_tenant() -> None:
    index = RadixIndex(BS)
    prompt = _tokens(0, 13)
    index.insert("tenant-a", prompt, [1, 2, 3], now=1.0)
    assert index.match("tenant-b", prompt, now=2.0).block_ids == []
    assert index.match("tenant-b", prompt, public_prefix_tokens=8, now=3.0).block_ids == []
    assert index.match("tenant-a", prompt, now=4.0).block_ids == [1, 2, 3]


def test_a_public_prefix_is_shared_but_its_private_continuation_is_not() -> None:
    index = RadixIndex(BS)
    prompt = _tokens(0, 13)
    index.insert("tenant-a", prompt, [1, 2, 3], public_prefix_tokens=8, now=1.0)
    assert index.match("tenant-b", prompt, public_prefix_tokens=8, now=2.0).block_ids == [1, 2]
    assert index.match("tenant-b", prompt, public_prefix_tokens=20, now=3.0).block_ids == [1, 2]
    assert index.match("tenant-b", prompt, public_prefix_tokens=4, now=4.0).block_ids == [1]
    assert index.match("tenant-b", prompt, now=5.0).block_ids == []  # sharing is opt-in
    assert index.match("tenant-a", prompt, public_prefix_tokens=8, now=6.0).block_ids == [1, 2, 3]
    # Block 1 (tokens 4..7) extends past 6 public tokens, so it is private to its tenant.
    keys_6 = list(iter_block_keys("tenant-b", prompt, BS, public_prefix_tokens=6))
    keys_8 = list(iter_block_keys("tenant-b", prompt, BS, public_prefix_tokens=8))
    assert keys_6[0] == keys_8[0] and keys_6[1] != keys_8[1]


def test_block_keys_are_stable_across_processes_and_machines() -> None:
    person = b"duet.kv.v1"
    public = hashlib.blake2b(
        bytes(16) + b"\x00" + struct.pack("<4I", 1, 2, 3, 4), digest_size=16, person=person
    ).digest()
    salt = b"tenant-a"
    private = hashlib.blake2b(
        public + b"\x01" + struct.pack("<I", len(salt)) + salt + struct.pack("<4I", 5, 6, 7, 8),
        digest_size=16,
        person=person,
    ).digest()
    assert public.hex() == "6dbd88807f9c80b355500b167a4ff37e"
    assert private.hex() == "99b92b7f7a6f4d247b3dbded4b32a324"
    keys = list(iter_block_keys("tenant-a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, public_prefix_tokens=4))
    assert keys == [public, private]
    assert block_key(keys[0], [5, 6, 7, 8], "tenant-a") == private


def test_locked_blocks_and_their_ancestors_are_never_evicted() -> None:
    index = RadixIndex(BS)
    index.insert("a", _tokens(0, 12), [1, 2, 3], now=1.0)
    index.lock([1, 2])
    assert index.num_evictable == 1
    assert index.evict(10) == [3]
    assert index.num_evictable == 0 and index.evict(10) == []
    index.unlock([2])  # block 1 is still locked, so block 2 is now an unlocked leaf
    assert index.evict(10) == [2]
    index.unlock([1])
    assert index.evict(10) == [1]
    index.insert("a", _tokens(0, 4), [1], now=2.0)
    index.lock([1])
    with pytest.raises(ValueError, match="unlocked more often"):
        index.unlock([1, 1])
    index.unlock([1])
    with pytest.raises(KeyError):
        index.lock([42])
    index.check_invariants()


def test_eviction_is_lru_and_a_match_refreshes() -> None:
    index = RadixIndex(BS)
    for i, block in enumerate([10, 20, 30]):
        index.insert("a", _tokens(100 * block, 4), [block], now=float(i))
    index.match("a", _tokens(1000, 5), now=5.0)  # refreshes block 10
    assert index.evict(1) == [20]
    assert index.evict(2) == [30, 10]
    index.check_invariants()


def test_an_interior_block_goes_only_after_its_children() -> None:
    index = RadixIndex(BS)
    trunk = _tokens(0, 4)
    index.insert("a", trunk + _tokens(50, 4), [1, 2], now=1.0)
    index.insert("a", trunk + _tokens(60, 4), [1, 3], now=2.0)
    index.insert("a", _tokens(90, 4), [4], now=3.0)
    assert index.num_evictable == 4
    assert index.evict(1) == [2]  # block 1 is older than block 4 but still has a child
    assert index.evict(2) == [3, 1]
    assert index.evict(5) == [4]
    assert index.num_blocks == 0
    index.check_invariants()


# --- randomized comparison with a simple reference model ---------------------------------------

RefKey = tuple[tuple[tuple[int, ...], str | None], ...]  # per block: (tokens, tenant or public)


@dataclass
class _RefBlock:
    block_id: int
    last_access: float
    locks: int = 0


class _Reference:
    """Full token prefixes and namespaces as dict keys; eviction by full scan."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.blocks: dict[RefKey, _RefBlock] = {}

    def keys(self, tenant: str, tokens: list[int], public: int, n: int) -> list[RefKey]:
        path: RefKey = ()
        out: list[RefKey] = []
        for i in range(n):
            namespace = None if (i + 1) * self.bs <= public else tenant
            path = (*path, (tuple(tokens[i * self.bs : (i + 1) * self.bs]), namespace))
            out.append(path)
        return out

    def match(self, tenant: str, tokens: list[int], public: int, now: float) -> list[int]:
        found: list[int] = []
        for key in self.keys(tenant, tokens, public, max(len(tokens) - 1, 0) // self.bs):
            if key not in self.blocks:
                break
            self.blocks[key].last_access = now
            found.append(self.blocks[key].block_id)
        return found

    def insert(
        self, tenant: str, tokens: list[int], ids: list[int], public: int, now: float
    ) -> InsertResult:
        keys = self.keys(tenant, tokens, public, len(tokens) // self.bs)
        adopted: list[int] = []
        duplicates: list[int] = []
        for key, block_id in zip(keys, ids[: len(keys)], strict=True):
            if key not in self.blocks:
                self.blocks[key] = _RefBlock(block_id, now)
                adopted.append(block_id)
            elif self.blocks[key].block_id != block_id:
                duplicates.append(block_id)
            self.blocks[key].last_access = now
        return InsertResult(len(adopted), adopted, duplicates)

    def lock(self, ids: list[int], step: int) -> None:
        by_id = {block.block_id: block for block in self.blocks.values()}
        for block_id in ids:
            by_id[block_id].locks += step

    def evict(self, n: int) -> list[int]:
        freed: list[int] = []
        while len(freed) < n:
            parents = {key[:-1] for key in self.blocks}
            leaves = [k for k, b in self.blocks.items() if k not in parents and b.locks == 0]
            if not leaves:
                break
            times = sorted(self.blocks[k].last_access for k in leaves)
            assert len(times) < 2 or times[0] < times[1], "test needs a unique LRU leaf"
            victim = min(leaves, key=lambda k: self.blocks[k].last_access)
            freed.append(self.blocks.pop(victim).block_id)
        return freed

    def num_evictable(self) -> int:
        pinned = {key[:j] for key, b in self.blocks.items() if b.locks for j in range(len(key))}
        pinned |= {key for key, b in self.blocks.items() if b.locks}
        return len(self.blocks) - len(pinned - {()})


def test_randomized_against_a_reference_model() -> None:
    rng = random.Random(20240611)
    bs = 2
    index, ref = RadixIndex(bs), _Reference(bs)
    bases = [[rng.randrange(3) for _ in range(rng.randrange(9))] for _ in range(4)]
    free_ids = list(range(1000))
    active: list[tuple[str, list[int], int, list[int]]] = []  # tenant, tokens, public, matched
    for step in range(3000):
        now = float(step)
        op = rng.random()
        if op < 0.45:  # a request arrives: match, lock what matched
            tenant = rng.choice(["a", "b", "c"])
            tokens = rng.choice(bases) + [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
            public = rng.choice([0, 0, 0, 2, 3, 4, 8, 50])
            got = index.match(tenant, tokens, public, now=now)
            assert got.block_ids == ref.match(tenant, tokens, public, now)
            assert got.num_tokens == len(got.block_ids) * bs
            index.lock(got.block_ids)
            ref.lock(got.block_ids, +1)
            active.append((tenant, tokens, public, got.block_ids))
        elif op < 0.85 and active:  # a request finishes its prefill: insert, unlock
            tenant, tokens, public, matched = active.pop(rng.randrange(len(active)))
            num_ids = -(-len(tokens) // bs)  # full blocks and the partial one
            reuse = matched if rng.random() < 0.8 else []  # else recomputed: duplicates
            ids = reuse + [free_ids.pop() for _ in range(num_ids - len(reuse))]
            got_insert = index.insert(tenant, tokens, ids, public, now=now)
            assert got_insert == ref.insert(tenant, tokens, ids, public, now)
            kept = set(got_insert.adopted) | set(reuse)
            free_ids.extend(block_id for block_id in ids if block_id not in kept)
            index.unlock(matched)
            ref.lock(matched, -1)
        else:
            n = rng.randrange(1, 6)
            evicted = index.evict(n)
            assert evicted == ref.evict(n)
            free_ids.extend(evicted)
        if index.num_blocks > 60:
            evicted = index.evict(20)
            assert evicted == ref.evict(20)
            free_ids.extend(evicted)
        index.check_invariants()
        assert index.num_blocks == len(ref.blocks)
        assert index.num_evictable == ref.num_evictable()
    for *_, matched in active:
        index.unlock(matched)
    assert index.num_evictable == index.num_blocks
    assert len(index.evict(10_000)) == len(ref.blocks)
    assert index.num_blocks == 0


def test_evict_skips_the_leaves_it_is_told_to_keep() -> None:
    index = RadixIndex(4)
    tokens = list(range(13))
    index.insert("t", tokens, [10, 11, 12], now=1.0)
    assert index.evict(3, keep={12}.__contains__) == []  # the leaf is kept, so its parents stay
    assert index.num_blocks == 3
    assert index.evict(3) == [12, 11, 10]  # still evictable afterwards, leaves first


def test_touch_keeps_blocks_and_their_ancestors_as_a_match_would() -> None:
    index = RadixIndex(BS)
    index.insert("a", _tokens(0, 8), [1, 2], now=1.0)
    index.insert("a", _tokens(100, 8), [3, 4], now=2.0)
    index.touch([2, 999], now=3.0)  # an id not indexed is skipped
    index.check_invariants()
    assert index.evict(2) == [4, 3]  # the untouched path goes first, leaf first
    with pytest.raises(ValueError, match="backwards"):
        index.touch([1], now=2.5)
