"""Choosing a unit for a request from the registry's cards: the least loaded live one, a burst
spread by what was sent since the last card, stale cards ignored, the configured unit when none
is live, and a prompt sent where its prefix is likely cached unless that unit is far busier."""

import dataclasses

from duetserve.proto.units import UnitCard
from duetserve.services.ingress.units import UnitDirectory
from duetserve.services.scheduler.card import PrefixSummary


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def card(
    unit: str, waiting: int = 0, running: int = 0, limit: int = 4, free: int = 10, at: float = 100
) -> UnitCard:
    return UnitCard(unit, f"scheduler-{unit}", waiting, running, limit, free, 100, at)


def test_with_no_card_it_is_the_configured_unit() -> None:
    assert UnitDirectory("unit7").choose() == "unit7"


def test_the_least_loaded_live_unit_and_a_burst_spreads() -> None:
    clock = Clock()
    units = UnitDirectory("unit0", stale_s=5.0, clock=clock, wall=clock)
    units.heard(card("a", waiting=2, running=4))  # load 1.5
    units.heard(card("b", running=1))  # load 0.25
    units.heard(card("c", running=2, limit=8))  # load 0.25
    # b and c tie at 0.25 and 10 free blocks: by name, b; then b has one more sent (0.5) and
    # c (0.25) goes next; then each in turn as their loads stay level.
    assert [units.choose() for _ in range(4)] == ["b", "c", "c", "b"]
    # A new card resets what was sent: it counts what the unit has now.
    units.heard(card("b", running=0))
    assert units.choose() == "b"


def test_more_free_blocks_break_a_tie() -> None:
    clock = Clock()
    units = UnitDirectory("unit0", clock=clock, wall=clock)
    units.heard(card("a", free=5))
    units.heard(card("b", free=50))
    assert units.choose() == "b"


def test_a_unit_whose_card_went_stale_is_not_chosen() -> None:
    clock = Clock()
    units = UnitDirectory("unit0", stale_s=5.0, clock=clock, wall=clock)
    units.heard(card("a", running=3))
    clock.now += 4.0
    units.heard(card("b", running=0, at=clock.now))
    assert units.choose() == "b"
    clock.now += 2.0  # a last heard of 6 s ago: dead or cut off
    units.heard(card("b", waiting=9, running=4, at=clock.now))
    assert [c.unit for c in units.live()] == ["b"]
    assert units.choose() == "b"
    clock.now += 6.0  # none left: the configured unit
    assert units.choose() == "unit0"


def test_a_card_read_long_after_it_was_written_is_stale_already() -> None:
    """A new ingress reads back the last card of a unit that died 9 s ago: not live."""
    clock = Clock()
    units = UnitDirectory("unit0", stale_s=5.0, clock=clock, wall=clock)
    units.heard(card("a", at=clock.now - 9.0))
    units.heard(card("b", at=clock.now + 3.0))  # a writer whose clock runs ahead: now
    assert [c.unit for c in units.live()] == ["b"]


def test_a_deleted_or_malformed_card_is_dropped_or_skipped() -> None:
    from duetserve.proto.codec import encode

    clock = Clock()
    units = UnitDirectory("unit0", clock=clock, wall=clock)
    units._apply("a.card", None, encode(card("a")))
    units._apply("b.card", None, b"\x93not a card")
    units._apply("c.card", None, encode(card("someone-else")))
    assert [c.unit for c in units.live()] == ["a"]
    units._apply("a.card", "DEL", None)
    assert units.live() == []


def summary_card(unit: str, prompts: list[tuple[str, list[int]]], **load: int) -> UnitCard:
    """A unit's card listing these (tenant, prompt) prefixes, as its scheduler writes it."""
    summary = PrefixSummary()
    for tenant, ids in prompts:
        summary.add(tenant, ids, 4, 0)
    return dataclasses.replace(card(unit, **load), block_size=4, prefixes=summary.keys())


def test_a_prompt_goes_where_its_prefix_is_warm_unless_that_unit_is_far_busier() -> None:
    clock = Clock()
    units = UnitDirectory("unit0", clock=clock, wall=clock)
    doc = list(range(1000, 1064))  # 16 blocks of 4
    units.heard(summary_card("warm", [("acme", [*doc, 1, 2, 3])], running=2))  # load 0.5
    units.heard(summary_card("cold", [], running=0))
    # The whole document was there: hit 64/68, worth more than the load it would add.
    assert units.choose("acme", [*doc, 7, 7, 7, 7]) == "warm"
    # Another tenant's prompt with the same tokens is private to acme there: no hit.
    assert units.choose("globex", [*doc, 7, 7, 7, 7]) == "cold"
    # An unrelated prompt goes by load alone.
    assert units.choose("acme", list(range(5000, 5064))) == "cold"
    # A warm unit busier by more than its whole running limit loses the prompt.
    units.heard(summary_card("warm", [("acme", doc)], waiting=6, running=4))  # load 2.5
    assert units.choose("acme", [*doc, 7, 7, 7, 7]) == "cold"


def test_the_match_goes_as_deep_as_the_summarised_depths_allow() -> None:
    """Depths 1, 2, 4, 8, 16... blocks: a prompt sharing 11 blocks matches at 8."""
    clock = Clock()
    units = UnitDirectory("unit0", clock=clock, wall=clock)
    doc = list(range(1000, 1064))
    shared = doc[:44] + list(range(9000, 9020))  # 11 blocks shared, then different
    units.heard(summary_card("a", [("t", doc)], running=1, limit=4))  # load 0.25
    units.heard(summary_card("b", [("t", shared[:8])], running=0))  # 2 blocks of it
    # a: hit 8*4/64 = 0.5 - 0.25 = 0.25; b: 2*4/64 = 0.125 - 0 = 0.125.
    assert units.choose("t", shared) == "a"


def test_the_summary_keeps_the_most_recent_keys() -> None:
    summary = PrefixSummary(capacity=3)
    summary.add("t", list(range(16)), 4, 0)  # depths 1, 2, 4: three keys
    first = summary.keys()
    assert len(first) == 3
    summary.add("t", list(range(100, 104)), 4, 0)  # one new key: the oldest goes
    assert summary.keys()[:2] == first[1:] and len(summary.keys()) == 3
    summary.add("t", list(range(16)), 4, 0)  # seen again: most recent now
    assert set(summary.keys()) == set(first)
