"""Scheduler <-> cache_index: exact prefix reuse over full KV blocks.

cache_index holds one kv_manager reference to every block it indexes. A match retains the
matched blocks for the asking owner in kv_manager BEFORE it answers, and cache_index handles one
message at a time, so a matched block can never be evicted, freed and reused in between.
Eviction drops the index's own references; a block that requests still use stays allocated
until they release it.
"""

from dataclasses import dataclass

from duetserve.proto.codec import message


@message("cache.match")
@dataclass(frozen=True, slots=True)
class PrefixMatchQuery:
    owner: str  # kv_manager owner that gets a reference to each matched block
    tenant: str
    token_ids: tuple[int, ...]
    public_prefix_tokens: int = 0


@message("cache.match.ok")
@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest cached run of full blocks, already retained for the query's owner."""

    block_ids: tuple[int, ...]
    num_tokens: int


@message("cache.insert")
@dataclass(frozen=True, slots=True)
class PrefixInsert:
    """Full blocks of a finished prefill: block_ids[i] holds tokens [i*bs, (i+1)*bs).
    Request/reply: the sender must hold references to the blocks until PrefixInserted."""

    tenant: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    public_prefix_tokens: int = 0


@message("cache.inserted")
@dataclass(frozen=True, slots=True)
class PrefixInserted:
    """Answered after cache_index took its own references to the adopted blocks: only then may
    the inserting owner release its references."""

    num_new: int


@message("cache.evict")
@dataclass(frozen=True, slots=True)
class EvictQuery:
    num_blocks: int


@message("cache.evicted")
@dataclass(frozen=True, slots=True)
class Evicted:
    block_ids: tuple[int, ...]
