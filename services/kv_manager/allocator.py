"""The unit's block allocator: the only place that hands out KV blocks. Pure: no I/O, no clock
(every call that needs the time takes `now`, from one monotonic clock), no torch.

Owners and holders. A reference is held by an owner, a string named "<holder>/<request>" by
convention ("decode-0/req-17", "sched/req-18"); an owner without "/" is its own holder
("cache_index"). The holder is the process that answers for the owner. Name holders with their
incarnation ("decode-0.3") so that a replacement process never inherits a dead one's leases.

References. An owner holds at most one reference per block; a block's refcount is the number of
owners holding it, and it is free exactly when that number is 0. Prefix sharing is one more owner
retaining the same blocks (another request, or the cache index).

Leases belong to holders, not to owners: one heartbeat, `renew(holder, now)`, keeps every owner
under the holder alive. A holder's lease starts (now + lease_s) when it first takes a reference
without one, and only `renew` extends it. A lease is live while now < deadline. A holder whose
lease has passed may still release, but takes no new references (`LeaseExpired`) until it renews;
`expire(now)` releases every reference of every holder whose lease has passed and fences the
holder off: it can never renew, allocate or retain again under that name (`Fenced`), since its
blocks may be someone else's by now; it starts over as a new holder. kv_manager then retries or
fails those requests with a reason.

Free list: LIFO. The block freed last is handed out first (its memory is the most likely to be
in cache), and a fresh allocator hands out 0, 1, 2, ... in order. One grant is sorted, so the
blocks of a request freed together come back to the next one as a contiguous run ("block
groups": one copy moves the run in a hand-off or a swap).

Every refused call raises a typed `AllocatorError` and changes nothing: batches are validated
whole before any state is touched.
"""

from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from duetserve.services.kv_manager.errors import (
    AlreadyHeld,
    DuplicateBlock,
    Fenced,
    InvalidCount,
    InvalidOwner,
    InvariantViolation,
    LeaseExpired,
    NotHeld,
    OutOfBlocks,
    UnknownBlock,
)

HOLDER_SEPARATOR = "/"
FENCED_KEPT = 65536  # names of expired holders remembered (the oldest forgotten first)


def holder_of(owner: str) -> str:
    """The holder part of an owner: "decode-0" for "decode-0/req-17" and for "decode-0"."""
    return owner.split(HOLDER_SEPARATOR, 1)[0]


class OwnerRelease(NamedTuple):
    """What one owner lost when its holder expired or was released."""

    owner: str
    held: list[int]  # every block it held a reference to, in the order it took them
    freed: list[int]  # those of `held` that nobody else held, now back on the free list


class BlockAllocator:
    def __init__(self, num_blocks: int, lease_s: float) -> None:
        if num_blocks < 0:
            raise InvalidCount(f"num_blocks must be >= 0, got {num_blocks}")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.lease_s = lease_s
        self._num_total = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: top is the end
        self._holders_of_block: dict[int, set[str]] = {}  # allocated blocks only
        self._held: dict[str, dict[int, None]] = {}  # owner -> blocks, in order; never empty
        self._owners_of_holder: dict[str, set[str]] = {}  # never empty
        self._lease_deadline: dict[str, float] = {}
        self._fenced: OrderedDict[str, None] = OrderedDict()

    # ---- taking references -------------------------------------------------------------

    def allocate(self, owner: str, count: int, now: float) -> list[int]:
        """`count` free blocks, each with one reference held by `owner`; all or nothing."""
        holder = self._check_owner(owner)
        if count < 0:
            raise InvalidCount(f"{owner} asked for {count} blocks")
        self._check_lease(holder, now)
        if count > len(self._free):
            raise OutOfBlocks(owner, count, len(self._free), self._num_total)
        # In ascending order: blocks freed together (one request's) come back as a run, and a
        # copy of runs moves many blocks at once (kv_transfer.runs: hand-offs, swaps).
        blocks = sorted(self._free.pop() for _ in range(count))
        for block in blocks:
            self._holders_of_block[block] = {owner}
        self._add_references(owner, blocks, now)
        return blocks

    def retain(self, owner: str, block_ids: Iterable[int], now: float) -> None:
        """One more reference, held by `owner`, on each of `block_ids` (all allocated)."""
        holder = self._check_owner(owner)
        blocks = self._check_batch(block_ids)
        self._check_lease(holder, now)
        unallocated = [b for b in blocks if b not in self._holders_of_block]
        if unallocated:
            raise UnknownBlock(
                f"{owner} cannot retain blocks that are not allocated: {unallocated}"
            )
        already = [b for b in blocks if owner in self._holders_of_block[b]]
        if already:
            raise AlreadyHeld(f"{owner} already holds blocks {already}")
        for block in blocks:
            self._holders_of_block[block].add(owner)
        self._add_references(owner, blocks, now)

    # ---- dropping references -----------------------------------------------------------

    def release(self, owner: str, block_ids: Iterable[int]) -> list[int]:
        """Drop `owner`'s reference on each block; returns the blocks that became free."""
        self._check_owner(owner)
        blocks = self._check_batch(block_ids)
        held = self._held.get(owner, {})
        missing = [b for b in blocks if b not in held]
        if missing:
            raise NotHeld(f"{owner} holds no reference to blocks {missing}")
        return self._drop_references(owner, blocks)

    def release_owner(self, owner: str) -> list[int]:
        """Drop every reference of `owner` (a request that ended, failed or was cancelled);
        returns the blocks that became free. An owner holding nothing is not an error."""
        self._check_owner(owner)
        return self._drop_references(owner, list(self._held.get(owner, ())))

    def release_holder(self, holder: str) -> list[OwnerRelease]:
        """Drop every reference of every owner under `holder`, and forget its lease (a worker
        that exited or was replaced). Owners in name order."""
        if not holder or HOLDER_SEPARATOR in holder:
            raise InvalidOwner(f"not a holder name: {holder!r}")
        releases = []
        for owner in sorted(self._owners_of_holder.get(holder, ())):
            held = list(self._held[owner])
            releases.append(OwnerRelease(owner, held, self._drop_references(owner, held)))
        self._lease_deadline.pop(holder, None)
        return releases

    # ---- leases ------------------------------------------------------------------------

    def renew(self, holder: str, now: float) -> float:
        """Heartbeat: the lease of `holder` (an owner name renews its holder) now runs to
        now + lease_s, never earlier than it already did. Returns the deadline."""
        holder = self._check_owner(holder)
        if holder in self._fenced:
            raise Fenced(holder)
        deadline = max(now + self.lease_s, self._lease_deadline.get(holder, now))
        self._lease_deadline[holder] = deadline
        return deadline

    def extend_all(self, now: float) -> None:
        """Every lease runs to at least now + lease_s: kv_manager was cut off from the holders
        (a NATS outage), so their silence says nothing of them, and each gets a full lease to
        beat again."""
        for holder, deadline in self._lease_deadline.items():
            self._lease_deadline[holder] = max(deadline, now + self.lease_s)

    def expire(self, now: float) -> list[OwnerRelease]:
        """Release every holder whose lease has passed (deadline <= now), holders in name
        order; returns who each owner was and what it held."""
        lapsed = self.lapsed(now)
        for holder in lapsed:
            self._fenced[holder] = None
            while len(self._fenced) > FENCED_KEPT:
                self._fenced.popitem(last=False)
        return [release for holder in lapsed for release in self.release_holder(holder)]

    def lapsed(self, now: float) -> list[str]:
        """The holders `expire(now)` would release, in name order."""
        return sorted(h for h, deadline in self._lease_deadline.items() if deadline <= now)

    def is_fenced(self, holder: str) -> bool:
        return holder_of(holder) in self._fenced

    def lease_deadline(self, holder: str) -> float | None:
        return self._lease_deadline.get(holder_of(holder))

    # ---- queries -----------------------------------------------------------------------

    @property
    def num_total(self) -> int:
        return self._num_total

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        self._check_in_range(block)
        return len(self._holders_of_block.get(block, ()))

    def owners_of(self, block: int) -> list[str]:
        """The owners holding a reference to `block`, sorted; empty when it is free."""
        self._check_in_range(block)
        return sorted(self._holders_of_block.get(block, ()))

    def references_by_holder(self) -> dict[str, int]:
        """How many block references each holder's owners hold, together."""
        counts: dict[str, int] = {}
        for owner, blocks in self._held.items():
            holder = holder_of(owner)
            counts[holder] = counts.get(holder, 0) + len(blocks)
        return counts

    def held_by(self, owner: str) -> list[int]:
        """The blocks `owner` holds a reference to, in the order it took them."""
        return list(self._held.get(owner, ()))

    def check_invariants(self) -> None:
        """Raise InvariantViolation unless the free list, the per-block holders, the per-owner
        references, the per-holder owners and the leases all agree."""
        free = set(self._free)
        allocated = set(self._holders_of_block)
        _require(len(free) == len(self._free), "a block is on the free list twice")
        _require(not free & allocated, f"blocks both free and referenced: {free & allocated}")
        _require(free | allocated == set(range(self._num_total)), "blocks lost or out of range")
        _require(all(self._holders_of_block.values()), "an allocated block with no reference")
        from_owners = sum(len(blocks) for blocks in self._held.values())
        from_blocks = sum(len(owners) for owners in self._holders_of_block.values())
        _require(from_owners == from_blocks, f"{from_owners} references != {from_blocks}")
        for owner, blocks in self._held.items():
            _require(bool(blocks), f"{owner} is listed holding nothing")
            for block in blocks:
                _require(owner in self._holders_of_block.get(block, ()), f"{owner}: {block}")
            _require(owner in self._owners_of_holder.get(holder_of(owner), ()), f"{owner}")
            _require(holder_of(owner) in self._lease_deadline, f"{owner} has no lease")
        listed = {o for owners in self._owners_of_holder.values() for o in owners}
        _require(listed == set(self._held), "holders' owner lists disagree with references")

    # ---- internals ---------------------------------------------------------------------

    def _check_owner(self, owner: str) -> str:
        holder, _, request = owner.partition(HOLDER_SEPARATOR)
        if not holder or (HOLDER_SEPARATOR in owner and not request):
            raise InvalidOwner(f"owner must be 'holder' or 'holder/request', got {owner!r}")
        return holder

    def _check_lease(self, holder: str, now: float) -> None:
        if holder in self._fenced:
            raise Fenced(holder)
        deadline = self._lease_deadline.get(holder)
        if deadline is not None and deadline <= now:
            raise LeaseExpired(holder, deadline, now)

    def _check_in_range(self, block: int) -> None:
        if not 0 <= block < self._num_total:
            raise UnknownBlock(f"block {block} is outside the pool of {self._num_total}")

    def _check_batch(self, block_ids: Iterable[int]) -> list[int]:
        blocks = list(block_ids)
        for block in blocks:
            self._check_in_range(block)
        if len(set(blocks)) != len(blocks):
            twice = sorted(b for b, n in Counter(blocks).items() if n > 1)
            raise DuplicateBlock(f"block ids listed more than once: {twice}")
        return blocks

    def _add_references(self, owner: str, blocks: list[int], now: float) -> None:
        if not blocks:
            return
        holder = holder_of(owner)
        self._held.setdefault(owner, {}).update(dict.fromkeys(blocks))
        self._owners_of_holder.setdefault(holder, set()).add(owner)
        self._lease_deadline.setdefault(holder, now + self.lease_s)

    def _drop_references(self, owner: str, blocks: list[int]) -> list[int]:
        if not blocks:
            return []
        freed = []
        held = self._held[owner]
        for block in blocks:
            del held[block]
            holders = self._holders_of_block[block]
            holders.discard(owner)
            if not holders:
                del self._holders_of_block[block]
                self._free.append(block)
                freed.append(block)
        if not held:
            del self._held[owner]
            owners = self._owners_of_holder[holder_of(owner)]
            owners.discard(owner)
            if not owners:
                del self._owners_of_holder[holder_of(owner)]
        return freed


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)
