"""Cached prompts whose KV may serve parts of new prompts wherever they sit (KVShare), over the
blocks the prefix index holds.

Pure and synchronous, like radix.py. An entry is one prompt the radix indexed: the tokens of its
full blocks and the radix's blocks holding them, in position order. The KV stays exactly as long
as the radix holds those blocks (the index's own kv_manager references), so the caller reports
every block the radix lets go (`forget`) and an entry shrinks to the blocks before the first one
gone. Entries are named by the path's last block (a radix block id names one path), so a prompt
that extends an indexed one replaces it.

Only exact KV is ever indexed: the radix holds blocks a prefill computed in full, and a prompt
prefilled over reused spans is inserted only up to its first reused token (the scheduler's
rule), so reused KV is never reused again at one more remove.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from duetserve.services.cache_index.spans import MIN_CHUNK, SpanIndex

MIN_SPAN = MIN_CHUNK  # shorter spans are not worth placing


@dataclass(frozen=True, slots=True)
class Span:
    """Tokens [start, start + length) of the new prompt equal tokens [source_start,
    source_start + length) of a cached prompt, whose K/V lie in source_block_ids: block i of
    them holds source positions [(source_start // bs + i) * bs, (source_start // bs + i + 1) * bs).
    """

    start: int
    length: int
    source_start: int
    source_block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Entry:
    tenant: str
    public: bool
    block_ids: tuple[int, ...]


class SpanCache:
    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.index = SpanIndex()
        self._entries: dict[str, _Entry] = {}
        self._by_block: dict[int, set[str]] = {}  # block id -> entries whose path holds it

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self, tenant: str, tokens: Sequence[int], block_ids: Sequence[int], public: bool = False
    ) -> None:
        """Index a prompt whose full blocks the radix holds as `block_ids` (position order);
        its spans are found by `tenant` only, or by every tenant when `public`."""
        num_full = min(len(tokens) // self.block_size, len(block_ids))
        if num_full * self.block_size < MIN_SPAN:
            return
        path = tuple(block_ids[:num_full])
        name = str(path[-1])
        for block in path:  # entries ending on this path are prefixes of it: replaced
            for other in list(self._by_block.get(block, ())):
                old = self._entries[other]
                if old.block_ids[-1] == block and (old.tenant, old.public) == (tenant, public):
                    self._remove(other)
        self._remove(name)
        self._entries[name] = _Entry(tenant, public, path)
        for block in path:
            self._by_block.setdefault(block, set()).add(name)
        self.index.add(name, tenant, tokens[: num_full * self.block_size], public)

    def match(self, tenant: str, tokens: Sequence[int], begin: int = 0) -> list[Span]:
        """Spans of `tokens` at or after `begin` (the exact prefix the caller has) found in
        `tenant`'s entries or public ones, each at least MIN_SPAN tokens, by start."""
        bs = self.block_size
        found: list[Span] = []
        for match in self.index.match(tenant, tokens, begin):
            start, source_start, length = match.start, match.source_start, match.length
            if start < begin:  # the part past the prefix
                cut = begin - start
                start, source_start, length = begin, source_start + cut, length - cut
            if length < MIN_SPAN:
                continue
            blocks = self._entries[match.entry].block_ids
            first, last = source_start // bs, (source_start + length - 1) // bs
            found.append(Span(start, length, source_start, blocks[first : last + 1]))
        return found

    def forget(self, block_ids: Sequence[int]) -> None:
        """The radix let these blocks go: entries holding one end before it."""
        for block in block_ids:
            for name in list(self._by_block.get(block, ())):
                entry = self._entries[name]
                keep = entry.block_ids[: entry.block_ids.index(block)]
                tokens = self.index.tokens(name)[: len(keep) * self.block_size]
                self._remove(name)
                if keep:
                    self.add(entry.tenant, tokens, keep, entry.public)

    def clear(self) -> None:
        self.index = SpanIndex()
        self._entries.clear()
        self._by_block.clear()

    def _remove(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        self.index.remove(name)
        for block in entry.block_ids:
            holders = self._by_block.get(block)
            if holders is not None:
                holders.discard(name)
                if not holders:
                    del self._by_block[block]
