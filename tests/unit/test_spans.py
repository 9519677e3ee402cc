"""Finding cached spans anywhere in a prompt (cache_index/spans.py) on hand-built prompts:
documents moved, reordered and edited; tenants apart unless an entry is public."""

import itertools

import numpy as np

from duetserve.services.cache_index.span_cache import MIN_SPAN, Span, SpanCache
from duetserve.services.cache_index.spans import (
    MAX_CHUNK,
    MAX_HOLDERS,
    MIN_CHUNK,
    SpanIndex,
    SpanMatch,
    boundaries,
)


def doc(seed: int, length: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 49152, length)]


DOC_A, DOC_B, DOC_C = doc(1, 400), doc(2, 300), doc(3, 500)
SYSTEM, Q1, Q2 = doc(4, 40), doc(5, 48), doc(6, 32)


def covered(matches: list[SpanMatch], start: int, length: int) -> int:
    """Tokens of [start, start + length) of the new prompt that some match covers."""
    return sum(
        max(0, min(m.start + m.length, start + length) - max(m.start, start)) for m in matches
    )


def check_equal(index: SpanIndex, sources: dict[str, list[int]], prompt: list[int]) -> None:
    """Every match maps to the same tokens in its entry."""
    for m in index.match("t", prompt):
        source = sources[m.entry]
        span = prompt[m.start : m.start + m.length]
        assert span == source[m.source_start : m.source_start + m.length]


def test_chunks_are_bounded_and_cut_the_same_way_wherever_a_document_sits() -> None:
    ends = boundaries(DOC_C)
    sizes = np.diff([0, *ends])
    assert ends[-1] == len(DOC_C) and all(s <= MAX_CHUNK for s in sizes)
    assert all(s >= MIN_CHUNK for s in sizes[:-1])
    alone = set(boundaries(DOC_C))
    shifted = {e - len(SYSTEM) for e in boundaries(SYSTEM + DOC_C) if e > len(SYSTEM)}
    # Past the first chunk (whose start depends on what comes before), the same cuts.
    assert {e for e in alone if e > MAX_CHUNK} <= shifted


def test_moved_and_reordered_documents_are_found_with_their_source_positions() -> None:
    index = SpanIndex()
    first = SYSTEM + DOC_A + DOC_B + Q1
    index.add("r1", "t", first)
    prompt = Q2 + DOC_B + SYSTEM + DOC_A + Q1[:20]
    matches = index.match("t", prompt)
    check_equal(index, {"r1": first}, prompt)  # each maps to the same tokens in the first
    b_start, a_start = len(Q2), len(Q2) + len(DOC_B) + len(SYSTEM)
    assert covered(matches, b_start, len(DOC_B)) >= 0.9 * len(DOC_B)
    assert covered(matches, a_start, len(DOC_A)) >= 0.9 * len(DOC_A)
    assert all(a.start + a.length <= b.start for a, b in itertools.pairwise(matches))


def test_an_edit_costs_only_the_tokens_it_changed() -> None:
    index = SpanIndex()
    index.add("r1", "t", SYSTEM + DOC_C + Q1)
    edited = list(DOC_C)
    edited[250] = (edited[250] + 1) % 49152
    prompt = Q2 + edited + Q1[:10]
    matches = index.match("t", prompt)
    start = len(Q2)
    # Alignment grows the chunks around the edit up to it from both sides.
    assert covered(matches, start, len(DOC_C)) >= len(DOC_C) - 1 - MIN_CHUNK
    assert covered(matches, start + 250, 1) == 0
    check_equal(index, {"r1": SYSTEM + DOC_C + Q1}, prompt)


def test_tenants_find_only_their_own_spans_and_public_ones() -> None:
    index = SpanIndex()
    index.add("private", "a", SYSTEM + DOC_A)
    index.add("shared", "a", DOC_B + Q1, public=True)
    prompt = Q2 + DOC_A + DOC_B
    assert {m.entry for m in index.match("a", prompt)} == {"private", "shared"}
    others = index.match("b", prompt)
    assert {m.entry for m in others} == {"shared"}
    assert covered(others, len(Q2), len(DOC_A)) == 0


def test_a_removed_entry_is_never_found_and_nothing_short_matches() -> None:
    index = SpanIndex()
    index.add("r1", "t", DOC_A)
    index.add("r2", "t", DOC_B)
    index.remove("r1")
    assert len(index) == 1
    assert index.match("t", Q2 + DOC_A) == []
    assert index.match("t", DOC_B[: MIN_CHUNK - 1]) == []
    assert {m.entry for m in index.match("t", Q1 + DOC_B)} == {"r2"}


def test_holders_of_one_chunk_are_capped_at_the_most_recent() -> None:
    index = SpanIndex()
    for n in range(MAX_HOLDERS + 4):
        index.add(f"e{n}", "t", SYSTEM + doc(100 + n, 64))
    entries = {m.entry for m in index.match("t", SYSTEM + Q1)}
    assert entries and entries <= {f"e{n}" for n in range(4, MAX_HOLDERS + 4)}
    # A prefix the caller has already is not looked up.
    assert index.match("t", SYSTEM + Q1, begin=len(SYSTEM)) == []


# ---- SpanCache: entries over the prefix index's blocks ----------------------------------

BS = 16


def blocks_of(base: int, tokens: list[int]) -> list[int]:
    return list(range(base, base + len(tokens) // BS))


def source_tokens(cache: SpanCache, sources: dict[int, list[int]], span: Span) -> list[int]:
    """The tokens the span's source blocks hold at its source positions."""
    first = span.source_start // BS
    out = []
    for p in range(span.source_start, span.source_start + span.length):
        block = span.source_block_ids[p // BS - first]
        out.append(sources[block][p % BS])
    return out


def test_span_cache_maps_spans_to_the_blocks_that_hold_them() -> None:
    cache = SpanCache(BS)
    cached = SYSTEM + DOC_A + DOC_B + Q1
    ids = blocks_of(100, cached)
    cache.add("t", cached, ids)
    by_block = {b: cached[i * BS : (i + 1) * BS] for i, b in enumerate(ids)}
    prompt = SYSTEM + DOC_B + DOC_A + Q2
    spans = cache.match("t", prompt, begin=32)
    assert spans and all(s.start >= 32 and s.length >= MIN_SPAN for s in spans)
    for span in spans:
        assert prompt[span.start : span.start + span.length] == source_tokens(cache, by_block, span)
    assert sum(s.length for s in spans) >= len(DOC_A) + len(DOC_B) - 64
    assert cache.match("u", prompt) == []


def test_span_cache_forgets_what_the_radix_let_go() -> None:
    cache = SpanCache(BS)
    cached = SYSTEM + DOC_A + DOC_B
    ids = blocks_of(100, cached)
    cache.add("t", cached, ids)
    cut = ids[(len(SYSTEM) + len(DOC_A)) // BS]  # DOC_B's blocks go from here on
    cache.forget([cut])
    spans = cache.match("t", DOC_B + DOC_A)
    assert all(cut not in s.source_block_ids for s in spans)
    assert all(b < cut for s in spans for b in s.source_block_ids)
    assert sum(s.length for s in spans) >= len(DOC_A) - 64
    cache.forget([ids[0]])
    assert len(cache) == 0 and cache.match("t", DOC_A) == []


def test_a_longer_prompt_on_the_same_path_replaces_its_prefix() -> None:
    cache = SpanCache(BS)
    short = SYSTEM + DOC_A
    long = short + DOC_B
    ids = blocks_of(100, long)
    cache.add("t", short, ids[: len(short) // BS])
    cache.add("t", long, ids)
    assert len(cache) == 1
    cache.add("t", doc(9, 10), [999])  # shorter than a span: not indexed
    assert len(cache) == 1
