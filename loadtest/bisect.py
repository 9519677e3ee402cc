"""The pure part of a rate sweep: the highest request rate at which SLO attainment still holds
a target, found by growing the rate and then bisecting. The caller supplies `measure` (a live
run, or the simulator); nothing here knows which.

The search assumes attainment falls as the rate rises. A live measurement is noisy, so a rate
near the threshold may hold on one probe and fail on the next: every probe is returned, for the
caller to plot or to check."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class Probe(NamedTuple):
    rate: float
    attainment: float


@dataclass(frozen=True, slots=True)
class MaxRate:
    """`rate`: the highest rate probed that held the target (0.0 if none did). `converged`:
    the next rate up that failed is within the tolerance of it, or `hi` itself held; False when
    `max_probes` ran out first. `probes`: every (rate, attainment) measured, in order."""

    rate: float
    converged: bool
    probes: list[Probe]


class _Search:
    def __init__(self, measure: Callable[[float], float], target: float, max_probes: int) -> None:
        self.measure, self.target, self.max_probes = measure, target, max_probes
        self.probes: list[Probe] = []

    @property
    def spent(self) -> bool:
        return len(self.probes) >= self.max_probes

    def holds(self, rate: float) -> bool:
        attainment = float(self.measure(rate))
        self.probes.append(Probe(rate, attainment))
        return attainment >= self.target


def find_max_rate(
    measure: Callable[[float], float],
    target: float = 0.9,
    lo: float = 1.0,
    hi: float | None = None,
    tolerance: float = 0.05,
    max_probes: int = 30,
) -> MaxRate:
    """The highest rate whose attainment (`measure(rate)`, a share in [0, 1]) is ≥ `target`.

    Starting at `lo`, the rate doubles (never past `hi`, when given) until attainment falls
    under the target; if `lo` already fails, it halves until one holds. Then the bracket
    between the highest rate that held and the lowest that failed is bisected until
    (failed − held) ≤ `tolerance` × held: `tolerance` is relative. At most `max_probes` calls
    of `measure`."""
    if lo <= 0 or tolerance <= 0 or max_probes < 1:
        raise ValueError("lo and tolerance must be positive and max_probes at least 1")
    if hi is not None and hi < lo:
        raise ValueError(f"hi ({hi}) is under lo ({lo})")
    search = _Search(measure, target, max_probes)
    held: float | None
    failed: float | None
    if search.holds(lo):
        held, failed = _grow(search, lo, hi)
    else:
        held, failed = _shrink(search, lo)
    if held is None or failed is None:
        return MaxRate(held or 0.0, held is not None and held == hi, search.probes)
    while failed - held > tolerance * held and not search.spent:
        middle = (held + failed) / 2
        if search.holds(middle):
            held = middle
        else:
            failed = middle
    return MaxRate(held, failed - held <= tolerance * held, search.probes)


def _grow(search: _Search, held: float, hi: float | None) -> tuple[float, float | None]:
    """Double from a rate that held until one fails (None: `hi` or the probes ran out)."""
    while not search.spent and held != hi:
        rate = held * 2 if hi is None else min(held * 2, hi)
        if not search.holds(rate):
            return held, rate
        held = rate
    return held, None


def _shrink(search: _Search, failed: float) -> tuple[float | None, float]:
    """Halve from a rate that failed until one holds (None: the probes ran out)."""
    while not search.spent:
        rate = failed / 2
        if search.holds(rate):
            return rate, failed
        failed = rate
    return None, failed
