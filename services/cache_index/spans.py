"""Finding reuse anywhere in a prompt (KVShare): cached spans that match parts of a new prompt
wherever they sit in it, not only as its prefix.

Pure and synchronous, like radix.py: no I/O, no KV. Entries are cached prompts (their tokens,
under an id the caller gives; the caller holds their KV and maps a matched span's tokens to
slots); the index only says which tokens of a new prompt equal which tokens of which entry.

Chunks. A prompt is cut at content-defined boundaries: after token t when a hash of the
WINDOW tokens ending at t falls in one value of AVERAGE (and the chunk holds MIN_CHUNK tokens
at least; MAX_CHUNK forces a cut). A boundary depends on nearby tokens only, so the same
document cuts the same way wherever it sits, and an edit moves only the boundaries within a
window of it: the chunks away from an edit are found again. Each chunk's key is a BLAKE2b
digest of its tokens alone, salted with its tenant (block_hash.py's namespaces): no tenant can
find another's spans, except in entries declared public (`duet.cache.public_spans`), keyed
without a salt and found by every tenant.

Matching. Every chunk of the new prompt is looked up; a hit is checked token for token against
its entry (a key collision never passes), then aligned: grown left and right, one token at a
time, while the entry and the prompt agree, which recovers the parts of chunks an edit cut
short. Spans are taken longest first, none overlapping another in the prompt.
"""

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from duetserve.common.block_hash import namespace_bytes

WINDOW = 8  # tokens a boundary hash looks at
AVERAGE = 32  # one position in AVERAGE is a boundary, so chunks average about this long
MIN_CHUNK = 16
MAX_CHUNK = 128
# Entries kept per chunk key, the most recent: a chunk every prompt shares (a system prompt)
# would otherwise make each match walk every entry.
MAX_HOLDERS = 8
PERSON = b"duet.span.v1"
_MASK = (1 << 61) - 1
_MULTIPLIER = 0x9E3779B97F4A7C15 & _MASK


class SpanMatch(NamedTuple):
    """Tokens [start, start + length) of the new prompt equal tokens [source_start,
    source_start + length) of entry `entry`."""

    start: int
    entry: str
    source_start: int
    length: int


@dataclass(frozen=True, slots=True)
class _Entry:
    tokens: tuple[int, ...]
    keys: tuple[bytes, ...]  # its chunks' keys, as indexed


def boundaries(tokens: Sequence[int]) -> list[int]:
    """Where the chunks of `tokens` end (the last is len(tokens)); each chunk is MIN_CHUNK to
    MAX_CHUNK tokens, but the last may be shorter."""
    ends: list[int] = []
    start = 0
    for t in range(len(tokens)):
        length = t + 1 - start
        if length >= MAX_CHUNK or (length >= MIN_CHUNK and _cuts_after(tokens, t)):
            ends.append(t + 1)
            start = t + 1
    if start < len(tokens):
        ends.append(len(tokens))
    return ends


def _cuts_after(tokens: Sequence[int], t: int) -> bool:
    """A boundary after token t: a hash of the WINDOW tokens ending at t, one in AVERAGE."""
    value = 0
    for token in tokens[max(0, t - WINDOW + 1) : t + 1]:
        value = (value * _MULTIPLIER + token + 1) & _MASK
    value = (value * _MULTIPLIER) & _MASK
    return (value >> 32) % AVERAGE == 0


def chunk_key(tokens: Sequence[int], tenant: str | None) -> bytes:
    """A chunk's key: its tokens alone, in its tenant's namespace (None: public)."""
    data = namespace_bytes(tenant) + struct.pack(f"<{len(tokens)}I", *tokens)
    return hashlib.blake2b(data, digest_size=16, person=PERSON).digest()


def _chunks(tokens: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each chunk."""
    out, start = [], 0
    for end in boundaries(tokens):
        out.append((start, end))
        start = end
    return out


class SpanIndex:
    """Cached prompts by the content of their chunks; see the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._by_key: dict[bytes, dict[str, int]] = {}  # key -> {entry: chunk start}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: str, tenant: str, tokens: Sequence[int], public: bool = False) -> None:
        """Index a cached prompt under `entry` (replacing one of that name): its chunks of
        MIN_CHUNK tokens or more, in `tenant`'s namespace, or in the public one."""
        self.remove(entry)
        namespace = None if public else tenant
        keys = []
        for start, end in _chunks(tokens):
            if end - start < MIN_CHUNK:
                continue  # a short tail would match by chance
            key = chunk_key(tokens[start:end], namespace)
            holders = self._by_key.setdefault(key, {})
            if entry not in holders:
                holders[entry] = start
                if len(holders) > MAX_HOLDERS:  # the oldest goes (dicts keep insertion order)
                    del holders[next(iter(holders))]
            keys.append(key)
        self._entries[entry] = _Entry(tuple(tokens), tuple(keys))

    def remove(self, entry: str) -> None:
        old = self._entries.pop(entry, None)
        if old is None:
            return
        for key in old.keys:
            holders = self._by_key.get(key)
            if holders is not None:
                holders.pop(entry, None)
                if not holders:
                    del self._by_key[key]

    def tokens(self, entry: str) -> tuple[int, ...]:
        return self._entries[entry].tokens

    def match(self, tenant: str, tokens: Sequence[int], begin: int = 0) -> list[SpanMatch]:
        """The spans of `tokens` found in entries of `tenant` or public ones, not overlapping
        in `tokens`, longest first; sorted by where they start in `tokens`. Chunks that end by
        `begin` (a prefix the caller has already) are not looked up."""
        found: list[SpanMatch] = []
        for start, end in _chunks(tokens):
            if end - start < MIN_CHUNK or end <= begin:
                continue
            piece = tokens[start:end]
            for namespace in (tenant, None):
                for entry, source_start in self._by_key.get(
                    chunk_key(piece, namespace), {}
                ).items():
                    source = self._entries[entry].tokens
                    if tuple(source[source_start : source_start + len(piece)]) != tuple(piece):
                        continue  # a key collision, never a match
                    found.append(self._aligned(tokens, start, entry, source_start, len(piece)))
        return _disjoint(found)

    def _aligned(
        self, tokens: Sequence[int], start: int, entry: str, source_start: int, length: int
    ) -> SpanMatch:
        """A hit grown left and right while the entry and the prompt agree."""
        source = self._entries[entry].tokens
        while start > 0 and source_start > 0 and tokens[start - 1] == source[source_start - 1]:
            start, source_start, length = start - 1, source_start - 1, length + 1
        while (
            start + length < len(tokens)
            and source_start + length < len(source)
            and tokens[start + length] == source[source_start + length]
        ):
            length += 1
        return SpanMatch(start, entry, source_start, length)


def _disjoint(found: list[SpanMatch]) -> list[SpanMatch]:
    """Longest first, each trimmed to what no longer span took; by start."""
    taken: list[SpanMatch] = []
    for span in sorted(set(found), key=lambda s: (-s.length, s.start, s.entry)):
        start, end = span.start, span.start + span.length
        for other in taken:
            other_end = other.start + other.length
            if other.start <= start < other_end:
                start = other_end
            if other.start < end <= other_end:
                end = other.start
        if end - start >= MIN_CHUNK and not any(
            o.start < end and start < o.start + o.length for o in taken
        ):
            shift = start - span.start
            taken.append(SpanMatch(start, span.entry, span.source_start + shift, end - start))
    return sorted(taken, key=lambda s: s.start)
