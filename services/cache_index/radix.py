"""Exact prefix reuse: a radix tree over full KV blocks, with LRU eviction of unlocked leaves.

Pure and synchronous: no I/O, no clocks (callers pass ``now``, which must never decrease), no
knowledge of requests or of the KV pool. Block ids are opaque ints owned by kv_manager; the index
only holds references to them.

Tree. Each node is one full block, named by its chained key (``block_hash``); since a key names
its whole prefix, nodes are found through one flat map and the tree is kept by parent pointers
and child counts. Tenant isolation and the public prefix live entirely in the keys.

Protocol (one owner per decision: this index decides what to keep; kv_manager frees):
1. ``match`` returns the longest cached chain of a prompt's blocks.
2. The caller ``lock``s what ``match`` returned *before* using it, and ``unlock``s it when the
   request no longer reads those blocks. A locked block is never evicted.
3. After prefill, ``insert`` indexes the prompt's full blocks. The index takes a reference to the
   blocks it ``adopted``; for ``duplicates`` it took none (see ``InsertResult``).
4. ``evict`` drops least-recently-used unlocked leaves; the caller frees the returned ids.

Invariants (``check_invariants`` verifies them all):
- every node's parent is indexed (eviction takes leaves only, so no node is ever orphaned);
- a block id is held by at most one node;
- a node is *pinned* iff it is locked or has a pinned child; pinned nodes are never evicted, and
  ``num_evictable == num_blocks - (number of pinned nodes)`` is exactly what repeated eviction
  can free;
- every unlocked leaf has exactly one heap entry, whose time is <= its last access (entries are
  refreshed lazily when popped); no node has more than one entry;
- a parent was accessed no earlier than any of its children (match and insert touch whole paths).
"""

import heapq
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from typing import NamedTuple

from duetserve.common.block_hash import BlockKey, iter_block_keys, num_public_blocks


class MatchResult(NamedTuple):
    """The cached prefix of a prompt: ``block_ids[i]`` holds tokens [i*bs, (i+1)*bs).

    ``num_tokens == len(block_ids) * block_size``: the prompt tokens the caller need not compute.
    """

    block_ids: list[int]
    num_tokens: int


class InsertResult(NamedTuple):
    """What ``insert`` did with the caller's full blocks, position by position.

    - ``adopted``: blocks newly indexed; the index now holds a reference to each (the caller must
      not free them; they come back through ``evict``). ``num_new == len(adopted)``.
    - ``duplicates``: blocks whose content the index already holds under another id (it keeps
      the first copy). The index took no reference: the caller keeps sole ownership, may go on
      reading them (the KV is identical) and releases them when its request is done.
    - Blocks in neither list were already the index's own (the caller matched them earlier).
    """

    num_new: int
    adopted: list[int]
    duplicates: list[int]


@dataclass(slots=True, eq=False)
class _Node:
    key: BlockKey
    block_id: int
    parent: "_Node | None"  # None: the first block of a chain
    last_access: float
    num_children: int = 0
    lock_ref: int = 0
    pinned_children: int = 0
    in_heap: bool = False

    @property
    def pinned(self) -> bool:
        return self.lock_ref > 0 or self.pinned_children > 0

    @property
    def evictable_leaf(self) -> bool:
        return self.num_children == 0 and self.lock_ref == 0


class RadixIndex:
    """Prefix index over full blocks of ``block_size`` tokens; see the module docstring."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self._nodes: dict[BlockKey, _Node] = {}
        self._by_block: dict[int, _Node] = {}
        self._heap: list[tuple[float, int, _Node]] = []  # (last access, tie-break, leaf)
        self._seq = count()
        self._num_pinned = 0
        self._now = float("-inf")

    @property
    def num_blocks(self) -> int:
        """Blocks the index holds a reference to."""
        return len(self._nodes)

    @property
    def num_evictable(self) -> int:
        """Blocks that ``evict`` could free now (no locked block in their subtree)."""
        return len(self._nodes) - self._num_pinned

    def match(
        self,
        tenant: str,
        token_ids: Sequence[int],
        public_prefix_tokens: int = 0,
        *,
        now: float,
    ) -> MatchResult:
        """The longest cached chain of the prompt's full blocks; touches the matched blocks.

        Never the whole prompt: at least one token is left to compute, since a request needs the
        logits of its last prompt token. The match is capped at ``(len(token_ids) - 1) // bs``
        blocks, the last full block that ends strictly before the final token.
        """
        self._advance(now, public_prefix_tokens)
        limit = max(len(token_ids) - 1, 0) // self.block_size
        capped = token_ids[: limit * self.block_size]
        nodes: list[_Node] = []
        for key in iter_block_keys(tenant, capped, self.block_size, public_prefix_tokens):
            node = self._nodes.get(key)
            if node is None:
                break
            nodes.append(node)
        for node in nodes:
            node.last_access = now
        return MatchResult([node.block_id for node in nodes], len(nodes) * self.block_size)

    def insert(
        self,
        tenant: str,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        public_prefix_tokens: int = 0,
        *,
        now: float,
    ) -> InsertResult:
        """Index the full blocks of a finished prefill; touches every block of the path.

        ``block_ids[i]`` holds tokens [i*bs, (i+1)*bs); ids past the last full block (a partial
        block) are ignored and stay the caller's. All-or-nothing: on ``ValueError`` (too few ids,
        an id indexed elsewhere or repeated) the index is unchanged.
        """
        self._advance(now, public_prefix_tokens)
        num_full = len(token_ids) // self.block_size
        if len(block_ids) < num_full:
            raise ValueError(f"{num_full} full blocks but only {len(block_ids)} block ids")
        full = token_ids[: num_full * self.block_size]
        keys = list(iter_block_keys(tenant, full, self.block_size, public_prefix_tokens))
        ids = list(block_ids[:num_full])
        self._check_insertable(keys, ids)
        adopted: list[int] = []
        duplicates: list[int] = []
        parent: _Node | None = None
        for key, block_id in zip(keys, ids, strict=True):
            node = self._nodes.get(key)
            if node is None:
                node = self._add_node(key, block_id, parent)
                adopted.append(block_id)
            elif node.block_id != block_id:
                duplicates.append(block_id)
            node.last_access = now
            parent = node
        if parent is not None and parent.evictable_leaf:
            self._push(parent)
        return InsertResult(len(adopted), adopted, duplicates)

    def lock(self, block_ids: Sequence[int]) -> None:
        """Count one more user of each block; a locked block (and so its ancestors) stays.

        Lock exactly what ``match`` returned, before using it. Raises ``KeyError`` (and locks
        nothing) if an id is not indexed.
        """
        nodes = [self._node_of(block_id) for block_id in block_ids]
        for node in nodes:
            was_pinned = node.pinned
            node.lock_ref += 1
            if not was_pinned:
                self._propagate_pin(node, pinned=True)

    def unlock(self, block_ids: Sequence[int]) -> None:
        """Undo one ``lock`` of each block. Raises (and unlocks nothing) on an unbalanced call."""
        nodes = [self._node_of(block_id) for block_id in block_ids]
        for node, times in Counter(nodes).items():
            if times > node.lock_ref:
                raise ValueError(f"block {node.block_id} unlocked more often than locked")
        for node in nodes:
            node.lock_ref -= 1
            if not node.pinned:
                self._propagate_pin(node, pinned=False)
            if node.evictable_leaf:
                self._push(node)

    def touch(self, block_ids: Sequence[int], *, now: float) -> None:
        """Mark these blocks (and so their ancestors) used now, as a match does its path: spans
        found by their content keep their blocks as a prefix match keeps its. Ids not indexed
        are skipped."""
        self._advance(now, 0)
        for block_id in block_ids:
            node = self._by_block.get(block_id)
            while node is not None and node.last_access < now:
                node.last_access = now
                node = node.parent

    def block_ids(self) -> list[int]:
        """Every block the index holds."""
        return list(self._by_block)

    def evict(self, num_blocks: int, keep: Callable[[int], bool] | None = None) -> list[int]:
        """Drop up to ``num_blocks`` least-recently-used unlocked leaves; returns their ids.
        Leaves whose block ``keep`` names stay (still evictable later), and so do their parents.

        Evicting a leaf may expose its parent as a new leaf, which then competes by its own last
        access. The index no longer references the returned ids: the caller frees them. Fewer are
        returned only when nothing else is evictable. O(k log n) plus lazy heap refreshes.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        freed: list[int] = []
        kept: list[_Node] = []
        while len(freed) < num_blocks and self._heap:
            entry_time, _, node = heapq.heappop(self._heap)
            node.in_heap = False
            if not node.evictable_leaf:
                continue  # pushed again when it next becomes an unlocked leaf
            if entry_time < node.last_access:
                self._push(node)  # touched since it was queued: requeue at its real time
                continue
            if keep is not None and keep(node.block_id):
                kept.append(node)
                continue
            self._remove(node)
            freed.append(node.block_id)
        for node in kept:
            self._push(node)
        return freed

    def _advance(self, now: float, public_prefix_tokens: int) -> None:
        """Validate the arguments shared by match and insert, then move the clock to ``now``."""
        num_public_blocks(public_prefix_tokens, self.block_size)  # raises if negative
        if not now >= self._now:  # also rejects NaN
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now

    def _node_of(self, block_id: int) -> _Node:
        node = self._by_block.get(block_id)
        if node is None:
            raise KeyError(f"block {block_id} is not in the prefix index")
        return node

    def _check_insertable(self, keys: list[BlockKey], ids: list[int]) -> None:
        seen: set[int] = set()
        for key, block_id in zip(keys, ids, strict=True):
            if block_id in seen:
                raise ValueError(f"block {block_id} given for two positions")
            seen.add(block_id)
            holder = self._by_block.get(block_id)
            if holder is not None and holder is not self._nodes.get(key):
                raise ValueError(f"block {block_id} is already indexed for other tokens")

    def _add_node(self, key: BlockKey, block_id: int, parent: _Node | None) -> _Node:
        node = _Node(key, block_id, parent, self._now)
        self._nodes[key] = node
        self._by_block[block_id] = node
        if parent is not None:
            parent.num_children += 1
        return node

    def _remove(self, node: _Node) -> None:
        del self._nodes[node.key]
        del self._by_block[node.block_id]
        parent = node.parent
        if parent is not None:
            parent.num_children -= 1
            if parent.evictable_leaf:
                self._push(parent)

    def _push(self, node: _Node) -> None:
        if not node.in_heap:
            heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
            node.in_heap = True

    def _propagate_pin(self, node: _Node, *, pinned: bool) -> None:
        """``node`` just flipped to ``pinned``; flip ancestors up to the first that stays put.

        Amortized O(1) per lock when a whole matched path is locked: the walk stops at the first
        ancestor that was already pinned.
        """
        step = 1 if pinned else -1
        self._num_pinned += step
        parent = node.parent
        while parent is not None:
            was_pinned = parent.pinned
            parent.pinned_children += step
            if parent.pinned == was_pinned:
                return
            self._num_pinned += step
            parent = parent.parent

    def check_invariants(self) -> None:
        """Recompute every invariant of the module docstring from scratch; raise on a breach."""
        children: Counter[int] = Counter()
        pinned_children: Counter[int] = Counter()
        for node in self._nodes.values():
            _require(self._nodes.get(node.key) is node, "node not under its key")
            _require(self._by_block.get(node.block_id) is node, "block id map disagrees")
            _require(node.lock_ref >= 0, f"negative lock on block {node.block_id}")
            if node.parent is not None:
                parent = node.parent
                _require(self._nodes.get(parent.key) is parent, "orphaned node")
                _require(parent.last_access >= node.last_access, "child newer than parent")
                children[id(parent)] += 1
                pinned_children[id(parent)] += node.pinned
        _require(len(self._by_block) == len(self._nodes), "stale block ids in the map")
        for node in self._nodes.values():
            _require(node.num_children == children[id(node)], "child count is off")
            _require(node.pinned_children == pinned_children[id(node)], "pin count is off")
        num_pinned = sum(node.pinned for node in self._nodes.values())
        _require(self._num_pinned == num_pinned, "pinned total is off")
        self._check_heap()

    def _check_heap(self) -> None:
        queued = Counter(id(node) for _, _, node in self._heap)
        for entry_time, _, node in self._heap:
            _require(self._nodes.get(node.key) is node, "evicted node still queued")
            _require(entry_time <= node.last_access, "heap entry from the future")
        for node in self._nodes.values():
            _require(queued[id(node)] == int(node.in_heap), "in_heap disagrees with the heap")
            _require(node.in_heap or not node.evictable_leaf, "unlocked leaf not queued")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"RadixIndex invariant broken: {message}")
