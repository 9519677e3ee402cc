"""The max-rate search against attainment curves whose threshold is known."""

import pytest

from duetserve.loadtest.bisect import Probe, find_max_rate


class Step:
    """Attainment 1.0 up to `threshold` requests/s, 0.5 above; remembers every call."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.calls: list[float] = []

    def __call__(self, rate: float) -> float:
        self.calls.append(rate)
        return 1.0 if rate <= self.threshold else 0.5


def test_grows_then_bisects_to_the_threshold() -> None:
    measure = Step(37.3)
    found = find_max_rate(measure, target=0.9, lo=1.0, tolerance=0.05)
    assert found.converged
    assert 37.3 / 1.05 <= found.rate <= 37.3
    assert [p.rate for p in found.probes] == measure.calls
    assert measure.calls[:9] == [1, 2, 4, 8, 16, 32, 64, 48, 40]  # then bisection
    assert Probe(64, 0.5) in found.probes


def test_smooth_curve() -> None:
    def measure(rate: float) -> float:
        return 1.0 / (1.0 + (rate / 20.0) ** 4)

    threshold = 20.0 * (1.0 / 9.0) ** 0.25  # where the curve crosses 0.9
    found = find_max_rate(measure, target=0.9, lo=0.5, tolerance=0.01)
    assert threshold / 1.01 <= found.rate <= threshold
    assert all(p.attainment == pytest.approx(measure(p.rate)) for p in found.probes)


def test_halves_when_the_first_rate_fails() -> None:
    found = find_max_rate(Step(0.3), lo=1.0, tolerance=0.05)
    assert [p.rate for p in found.probes[:3]] == [1.0, 0.5, 0.25]
    assert 0.3 / 1.05 <= found.rate <= 0.3


def test_cap_and_exhaustion() -> None:
    capped = find_max_rate(Step(100.0), lo=1.0, hi=10.0)
    assert (capped.rate, capped.converged) == (10.0, True)
    assert [p.rate for p in capped.probes] == [1.0, 2.0, 4.0, 8.0, 10.0]
    hopeless = find_max_rate(lambda _: 0.0, lo=1.0, max_probes=6)
    assert (hopeless.rate, hopeless.converged, len(hopeless.probes)) == (0.0, False, 6)
    with pytest.raises(ValueError):
        find_max_rate(Step(1.0), lo=2.0, hi=1.0)
