"""Scheduler <-> cache_index: exact prefix reuse over full KV blocks.

cache_index holds one kv_manager reference to every block it indexes. A match retains the
matched blocks for the asking owner in kv_manager BEFORE it answers, and cache_index handles one
message at a time, so a matched block can never be evicted, freed and reused in between.
Eviction drops the index's own references; a block that requests still use stays allocated
until they release it.

With a host tier (DUET_HOST_KV_MB), the index keeps a second radix over host-tier blocks: KV a
request took there by a swap and left behind when it ended (the earlier turns of a
conversation). A match may extend past the pool's blocks with host blocks, which the scheduler
loads back instead of recomputing; the same blocks stay the request's host copy, so a later
swap-out copies only what is new.

Spans (KVShare): every prompt indexed in the pool's radix is also indexed by the content of its
chunks (cache_index/span_cache.py), so a match asked for `spans` also names parts of the prompt
past the prefix that equal parts of cached prompts wherever they sit; their source blocks are
retained for the owner like the prefix's, for the prefill that copies from them.
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
    host: bool = False  # also match the host tier's index (host_block_ids)
    spans: bool = False  # also find cached spans anywhere past the prefix (KVShare)
    # Only say how much would match: nothing retained, no block ids in the answer (its
    # num_tokens and spans still say what is cached). Scheduling by hit rate asks this.
    peek: bool = False


@dataclass(frozen=True, slots=True)
class CachedSpan:
    """Tokens [start, start + length) of the prompt equal tokens [source_start, source_start +
    length) of a cached prompt, whose K/V lie in source_block_ids: block i of them holds
    source positions from (source_start // block_size + i) * block_size on."""

    start: int
    length: int
    source_start: int
    source_block_ids: tuple[int, ...]


@message("cache.match.ok")
@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest cached run of full blocks, already retained for the query's owner.

    host_block_ids (asked for with `host`): the longest run of the host tier's blocks holding
    the prompt's first blocks, retained for the owner in kv.HOST_POOL; it may be shorter or
    longer than block_ids (num_tokens counts block_ids only)."""

    block_ids: tuple[int, ...]
    num_tokens: int
    host_block_ids: tuple[int, ...] = ()
    # Asked for with `spans`: cached spans past the prefix, by start, and their source blocks
    # (those not in block_ids), retained for the owner too until it releases them.
    spans: tuple[CachedSpan, ...] = ()
    span_block_ids: tuple[int, ...] = ()


@message("cache.insert")
@dataclass(frozen=True, slots=True)
class PrefixInsert:
    """Full blocks of a finished prefill: block_ids[i] holds tokens [i*bs, (i+1)*bs).
    Request/reply: the sender must hold references to the blocks until PrefixInserted."""

    tenant: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    public_prefix_tokens: int = 0
    pool: str = ""  # kv.UNIT_POOL, or kv.HOST_POOL for blocks of the host tier
    public_spans: bool = False  # its spans may be found by every tenant (duet.cache.public_spans)


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
