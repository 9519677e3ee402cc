"""Choosing a unit for a request from the registry's cards: the least loaded live one, a
burst spread by what was sent since the last card, stale cards ignored, the configured unit
when none is live."""

from duetserve.proto.units import UnitCard
from duetserve.services.ingress.units import UnitDirectory


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
