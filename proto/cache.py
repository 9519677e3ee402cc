"""Scheduler <-> cache_index: exact prefix reuse over full KV blocks."""

from dataclasses import dataclass

from duetserve.proto.codec import message


@message("cache.match")
@dataclass(frozen=True, slots=True)
class PrefixMatchQuery:
    tenant: str
    token_ids: tuple[int, ...]
    public_prefix_tokens: int = 0


@message("cache.match.ok")
@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest cached run of full blocks; the caller retains them before use."""

    block_ids: tuple[int, ...]
    num_tokens: int


@message("cache.insert")
@dataclass(frozen=True, slots=True)
class PrefixInsert:
    """Full blocks of a finished prefill: block_ids[i] holds tokens [i*bs, (i+1)*bs)."""

    tenant: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    public_prefix_tokens: int = 0


@message("cache.evict")
@dataclass(frozen=True, slots=True)
class EvictQuery:
    num_blocks: int


@message("cache.evicted")
@dataclass(frozen=True, slots=True)
class Evicted:
    block_ids: tuple[int, ...]
