"""BlockAllocator: references, refusals that change nothing, holder leases, and a seeded random
run checked step by step against a plain model of who holds what."""

import random
from collections import Counter
from collections.abc import Callable

import pytest

from duetserve.services.kv_manager.allocator import BlockAllocator, OwnerRelease, holder_of
from duetserve.services.kv_manager.errors import (
    AlreadyHeld,
    DuplicateBlock,
    Fenced,
    InvalidCount,
    InvalidOwner,
    LeaseExpired,
    NotHeld,
    OutOfBlocks,
    UnknownBlock,
)

LEASE = 10.0


def snapshot(alloc: BlockAllocator) -> tuple[int, list[list[str]]]:
    return alloc.num_free, [alloc.owners_of(b) for b in range(alloc.num_total)]


def test_allocate_release_round_trip() -> None:
    alloc = BlockAllocator(8, LEASE)
    blocks = alloc.allocate("decode-0/req-1", 3, now=0.0)
    assert blocks == [0, 1, 2]  # a fresh allocator hands out ids in order
    assert alloc.num_free == 5 and alloc.num_total == 8
    assert all(alloc.refcount(b) == 1 for b in blocks)
    assert alloc.owners_of(1) == ["decode-0/req-1"]
    assert alloc.held_by("decode-0/req-1") == [0, 1, 2]
    assert alloc.release("decode-0/req-1", blocks) == [0, 1, 2]
    assert alloc.num_free == 8 and alloc.held_by("decode-0/req-1") == []
    assert all(alloc.refcount(b) == 0 for b in range(8))
    alloc.check_invariants()


def test_free_list_is_lifo() -> None:
    alloc = BlockAllocator(8, LEASE)
    alloc.allocate("a/1", 4, now=0.0)
    alloc.release("a/1", [2, 0])
    assert alloc.allocate("a/2", 2, now=0.0) == [0, 2]  # freed last, handed out first


def test_blocks_freed_together_come_back_as_one_ascending_run() -> None:
    """Block groups: a request's blocks, freed together, are the next grant's contiguous run,
    whatever order they were freed in, so one copy moves them (hand-offs, swaps)."""
    alloc = BlockAllocator(64, LEASE)
    first = alloc.allocate("sched/a", 8, now=0.0)
    alloc.allocate("sched/b", 8, now=0.0)
    alloc.release("sched/a", list(reversed(first)))
    assert alloc.allocate("sched/c", 8, now=0.0) == first == list(range(8))
    alloc.release("sched/b", alloc.held_by("sched/b"))
    again = alloc.allocate("sched/d", 5, now=0.0)
    assert again == sorted(again) and again[-1] - again[0] == 4


def test_allocate_is_all_or_nothing() -> None:
    alloc = BlockAllocator(4, LEASE)
    alloc.allocate("a/1", 3, now=0.0)
    before = snapshot(alloc)
    with pytest.raises(OutOfBlocks, match="asked for 2 blocks, 1 of 4 are free") as info:
        alloc.allocate("a/2", 2, now=0.0)
    assert (info.value.requested, info.value.num_free, info.value.num_total) == (2, 1, 4)
    assert snapshot(alloc) == before and alloc.held_by("a/2") == []
    assert alloc.allocate("a/2", 1, now=0.0) == [3]
    assert alloc.allocate("a/3", 0, now=0.0) == []
    with pytest.raises(InvalidCount):
        alloc.allocate("a/3", -1, now=0.0)
    alloc.check_invariants()


def test_retain_and_release_count_references() -> None:
    alloc = BlockAllocator(6, LEASE)
    blocks = alloc.allocate("prefill-0/req-1", 3, now=0.0)
    alloc.retain("cache_index", blocks[:2], now=0.0)
    alloc.retain("decode-0/req-2", blocks[:1], now=0.0)
    assert [alloc.refcount(b) for b in blocks] == [3, 2, 1]
    assert alloc.owners_of(blocks[0]) == ["cache_index", "decode-0/req-2", "prefill-0/req-1"]
    assert alloc.release_owner("prefill-0/req-1") == [blocks[2]]  # only the unshared one frees
    assert alloc.release("cache_index", blocks[:2]) == [blocks[1]]
    assert alloc.release("decode-0/req-2", blocks[:1]) == [blocks[0]]
    assert alloc.num_free == 6
    alloc.check_invariants()


def test_retain_refuses_free_unknown_held_and_repeated_blocks() -> None:
    alloc = BlockAllocator(4, LEASE)
    blocks = alloc.allocate("a/1", 2, now=0.0)
    before = snapshot(alloc)
    with pytest.raises(UnknownBlock, match="not allocated"):
        alloc.retain("b/1", [blocks[0], 3], now=0.0)
    with pytest.raises(UnknownBlock, match="outside the pool"):
        alloc.retain("b/1", [4], now=0.0)
    with pytest.raises(AlreadyHeld):
        alloc.retain("a/1", [blocks[1]], now=0.0)
    with pytest.raises(DuplicateBlock):
        alloc.retain("b/1", [blocks[0], blocks[0]], now=0.0)
    assert snapshot(alloc) == before
    alloc.check_invariants()


def test_releasing_a_reference_not_held_changes_nothing() -> None:
    alloc = BlockAllocator(4, LEASE)
    mine = alloc.allocate("a/1", 2, now=0.0)
    theirs = alloc.allocate("b/1", 1, now=0.0)
    before = snapshot(alloc)
    with pytest.raises(NotHeld, match=rf"a/1 holds no reference to blocks \[{theirs[0]}\]"):
        alloc.release("a/1", [mine[0], theirs[0]])  # the valid one is not released either
    with pytest.raises(DuplicateBlock):
        alloc.release("a/1", [mine[0], mine[0]])
    assert snapshot(alloc) == before
    assert alloc.release_owner("nobody/1") == []
    alloc.check_invariants()


def test_owner_names_are_checked() -> None:
    alloc = BlockAllocator(2, LEASE)
    for bad in ["", "/req-1", "decode-0/"]:
        with pytest.raises(InvalidOwner):
            alloc.allocate(bad, 1, now=0.0)
    with pytest.raises(InvalidOwner):
        alloc.release_holder("decode-0/req-1")
    assert (
        holder_of("decode-0/req-1/part") == "decode-0" and holder_of("cache_index") == "cache_index"
    )


def test_expiry_returns_exactly_the_owners_blocks_and_frees_only_unshared_ones() -> None:
    alloc = BlockAllocator(8, LEASE)
    dead = alloc.allocate("decode-0/req-1", 3, now=0.0)
    alive = alloc.allocate("decode-1/req-2", 2, now=0.0)
    alloc.retain("cache_index", dead[:1], now=0.0)
    alloc.renew("decode-1", now=5.0)
    alloc.renew("cache_index", now=5.0)
    assert alloc.expire(now=9.9) == []  # a lease is live while now < deadline
    expired = alloc.expire(now=10.0)
    assert expired == [OwnerRelease("decode-0/req-1", held=dead, freed=dead[1:])]
    assert alloc.refcount(dead[0]) == 1 and alloc.owners_of(dead[0]) == ["cache_index"]
    assert alloc.held_by("decode-1/req-2") == alive
    assert alloc.lease_deadline("decode-0") is None and alloc.lease_deadline("decode-1") == 15.0
    alloc.check_invariants()


def test_a_holder_that_stops_heart_beating_loses_all_its_requests() -> None:
    alloc = BlockAllocator(16, LEASE)
    worker = {
        f"decode-0/req-{i}": alloc.allocate(f"decode-0/req-{i}", 2, now=0.0) for i in range(3)
    }
    other = alloc.allocate("decode-10/req-9", 2, now=0.0)  # a prefix of the name, another holder
    alloc.renew("decode-10", now=8.0)
    expired = alloc.expire(now=12.0)
    assert {r.owner: r.held for r in expired} == worker
    assert all(r.freed == r.held for r in expired)
    assert alloc.held_by("decode-10/req-9") == other
    assert alloc.num_free == 16 - 2
    alloc.check_invariants()


def test_a_lapsed_holder_takes_nothing_new_until_it_renews() -> None:
    alloc = BlockAllocator(4, LEASE)
    held = alloc.allocate("prefill-0/req-1", 1, now=0.0)
    with pytest.raises(LeaseExpired) as info:
        alloc.allocate("prefill-0/req-2", 1, now=10.0)
    assert (info.value.holder, info.value.deadline) == ("prefill-0", 10.0)
    with pytest.raises(LeaseExpired):
        alloc.retain("prefill-0/req-2", held, now=11.0)
    assert alloc.release("prefill-0/req-1", held) == held  # releasing is always allowed
    assert alloc.renew("prefill-0/req-1", now=11.0) == 21.0  # an owner's name renews its holder
    assert alloc.allocate("prefill-0/req-2", 1, now=12.0) == held
    assert alloc.renew("prefill-0", now=1.0) == 21.0  # never moves a deadline earlier


def test_release_holder_drops_every_owner_and_the_lease() -> None:
    alloc = BlockAllocator(6, LEASE)
    a = alloc.allocate("prefill-0/req-1", 2, now=0.0)
    b = alloc.allocate("prefill-0/req-2", 1, now=0.0)
    alloc.retain("decode-0/req-1", a, now=0.0)
    released = alloc.release_holder("prefill-0")
    assert released == [
        OwnerRelease("prefill-0/req-1", held=a, freed=[]),
        OwnerRelease("prefill-0/req-2", held=b, freed=b),
    ]
    assert alloc.lease_deadline("prefill-0") is None
    assert alloc.release_holder("prefill-0") == []
    alloc.check_invariants()


class Model:
    """Who holds what, kept the obvious way."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs: dict[str, set[int]] = {}
        self.deadline: dict[str, float] = {}
        self.fenced: set[str] = set()
        self.incarnation = [0, 0, 0]  # of holders w0, w1, w2: the next one after a fence

    def allocated(self) -> set[int]:
        return set().union(*self.refs.values())

    def lapsed(self, owner: str, now: float) -> bool:
        return self.deadline.get(holder_of(owner), float("inf")) <= now

    def take(self, owner: str, blocks: list[int], now: float) -> None:
        if blocks:
            self.refs.setdefault(owner, set()).update(blocks)
            self.deadline.setdefault(holder_of(owner), now + LEASE)

    def drop(self, owner: str, blocks: set[int]) -> None:
        self.refs[owner] -= blocks
        if not self.refs[owner]:
            del self.refs[owner]

    def expire(self, now: float) -> set[str]:
        lapsed = {h for h, d in self.deadline.items() if d <= now}
        for owner in [o for o in self.refs if holder_of(o) in lapsed]:
            del self.refs[owner]
        for holder in lapsed:
            del self.deadline[holder]
        self.fenced |= lapsed
        for holder in lapsed:
            number = int(holder[1 : holder.index(".")])
            self.incarnation[number] += 1
        return lapsed

    def owner(self, rng: random.Random) -> str:
        """Mostly a live holder's owner; now and then one of a fenced incarnation."""
        number = rng.randrange(3)
        incarnation = self.incarnation[number]
        if incarnation and rng.random() < 0.1:
            incarnation = rng.randrange(incarnation)
        return f"w{number}.{incarnation}/r{rng.randrange(4)}"


Step = Callable[[BlockAllocator, Model, random.Random, str, float], str]


def step_allocate(
    alloc: BlockAllocator, model: Model, rng: random.Random, owner: str, now: float
) -> str:
    count = rng.randrange(6)
    if holder_of(owner) in model.fenced:
        with pytest.raises(Fenced):
            alloc.allocate(owner, count, now)
        return "allocate: fenced"
    if model.lapsed(owner, now):
        with pytest.raises(LeaseExpired):
            alloc.allocate(owner, count, now)
        return "allocate: lease expired"
    if count > model.num_blocks - len(model.allocated()):
        with pytest.raises(OutOfBlocks):
            alloc.allocate(owner, count, now)
        return "allocate: out of blocks"
    blocks = alloc.allocate(owner, count, now)
    assert len(blocks) == count and not set(blocks) & model.allocated()
    model.take(owner, blocks, now)
    return "allocate: ok"


def step_retain(
    alloc: BlockAllocator, model: Model, rng: random.Random, owner: str, now: float
) -> str:
    allocated = sorted(model.allocated())
    pool = allocated if allocated and rng.random() < 0.7 else list(range(model.num_blocks))
    blocks = rng.sample(pool, min(len(pool), rng.randrange(1, 4)))
    expected: type[Exception] | None = None
    if holder_of(owner) in model.fenced:
        expected = Fenced
    elif model.lapsed(owner, now):
        expected = LeaseExpired
    elif not set(blocks) <= model.allocated():
        expected = UnknownBlock
    elif set(blocks) & model.refs.get(owner, set()):
        expected = AlreadyHeld
    if expected is None:
        alloc.retain(owner, blocks, now)
        model.take(owner, blocks, now)
        return "retain: ok"
    with pytest.raises(expected):
        alloc.retain(owner, blocks, now)
    return f"retain: {expected.__name__}"


def step_release(
    alloc: BlockAllocator, model: Model, rng: random.Random, owner: str, now: float
) -> str:
    held = sorted(model.refs.get(owner, set()))
    blocks = rng.sample(held, rng.randrange(len(held) + 1))
    if rng.random() < 0.2:
        blocks.append(rng.randrange(model.num_blocks))
    if len(set(blocks)) != len(blocks) or not set(blocks) <= set(held):
        with pytest.raises((NotHeld, DuplicateBlock)):
            alloc.release(owner, blocks)
        return "release: refused"
    before = model.allocated()
    if blocks:
        model.drop(owner, set(blocks))
    assert set(alloc.release(owner, blocks)) == before - model.allocated()
    return "release: ok"


def step_release_owner(
    alloc: BlockAllocator, model: Model, rng: random.Random, owner: str, now: float
) -> str:
    before = model.allocated()
    model.refs.pop(owner, None)
    assert set(alloc.release_owner(owner)) == before - model.allocated()
    return "release_owner"


def step_renew(
    alloc: BlockAllocator, model: Model, rng: random.Random, owner: str, now: float
) -> str:
    holder = holder_of(owner)
    if holder in model.fenced:
        with pytest.raises(Fenced):
            alloc.renew(holder, now)
        return "renew: fenced"
    assert alloc.renew(holder, now) == max(model.deadline.get(holder, now), now + LEASE)
    model.deadline[holder] = max(model.deadline.get(holder, now), now + LEASE)
    return "renew"


def step_expire(
    alloc: BlockAllocator, model: Model, rng: random.Random, owner: str, now: float
) -> str:
    refs = dict(model.refs)
    lapsed = model.expire(now)
    expired = alloc.expire(now)
    assert {r.owner: set(r.held) for r in expired} == {
        o: b for o, b in refs.items() if holder_of(o) in lapsed
    }
    return "expire: some" if expired else "expire: none"


STEPS: list[Step] = [
    step_allocate,
    step_allocate,
    step_retain,
    step_release,
    step_release_owner,
    step_renew,
    step_expire,
]


def test_random_operations_match_a_model() -> None:
    rng = random.Random(20240611)
    alloc = BlockAllocator(24, LEASE)
    model = Model(24)
    outcomes: Counter[str] = Counter()
    now = 0.0
    for _ in range(4000):
        now += rng.choice([0.0, 0.0, 0.5, 1.0, 3.0])
        owner = model.owner(rng)
        outcomes[rng.choice(STEPS)(alloc, model, rng, owner, now)] += 1
        alloc.check_invariants()
        assert alloc.num_free == 24 - len(model.allocated())
        for block in range(24):
            holders = sorted(o for o, b in model.refs.items() if block in b)
            assert alloc.owners_of(block) == holders
        for owner, blocks in model.refs.items():
            assert set(alloc.held_by(owner)) == blocks
    rare = {k: v for k, v in outcomes.items() if v < 20}
    assert len(outcomes) == 16 and not rare, outcomes  # every path, refusals included, was taken


def test_extending_every_lease_gives_each_a_full_lease_and_never_shortens_one() -> None:
    allocator = BlockAllocator(4, lease_s=5.0)
    allocator.allocate("a/r", 1, now=0.0)  # lease to 5
    allocator.allocate("b/r", 1, now=0.0)
    allocator.renew("b", now=20.0)  # lease to 25
    allocator.extend_all(now=10.0)  # back from an outage at 10
    assert allocator.lease_deadline("a") == 15.0
    assert allocator.lease_deadline("b") == 25.0
    assert allocator.expire(now=14.9) == []
    allocator.check_invariants()


def test_a_holder_whose_lease_lapsed_is_fenced_off_for_good() -> None:
    """Its blocks may be someone else's by now: a late heartbeat must not revive it (it would
    go on writing blocks given away), nor may it take new ones under that name."""
    alloc = BlockAllocator(4, lease_s=1.0)
    alloc.allocate("decode-7/r", 2, now=0.0)
    assert [r.owner for r in alloc.expire(now=1.0)] == ["decode-7/r"]
    assert alloc.is_fenced("decode-7") and alloc.is_fenced("decode-7/r")
    with pytest.raises(Fenced):
        alloc.renew("decode-7", now=1.1)
    with pytest.raises(Fenced):
        alloc.allocate("decode-7/s", 1, now=1.1)
    assert alloc.release_owner("decode-7/r") == []  # releasing stays harmless
    assert len(alloc.allocate("decode-8/r", 4, now=1.1)) == 4  # its successor, a new holder
    alloc.check_invariants()
