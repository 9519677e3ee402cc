"""SLO verdicts at ingress (services/ingress/attainment.py): latency by TTFT and vLLM's TPOT,
compound groups judged from their first arrival, and unfinished groups expired as missed."""

import pytest

from duetserve.proto.scheduling import Slo, SloKind
from duetserve.services.ingress.attainment import CompoundGroups, latency_met


def group_slo(name: str = "g", size: int | None = 2, deadline_ms: float = 1000.0) -> Slo:
    return Slo(SloKind.COMPOUND, deadline_ms=deadline_ms, group=name, group_size=size)


def test_latency_is_ttft_and_vllm_tpot() -> None:
    slo = Slo(SloKind.LATENCY, ttft_ms=100.0, tpot_ms=10.0)
    # 11 tokens: TPOT = (E2E - TTFT) / 10.
    assert latency_met(slo, ttft_s=0.1, e2e_s=0.2, completion_tokens=11)
    assert not latency_met(slo, ttft_s=0.1, e2e_s=0.21, completion_tokens=11)
    assert not latency_met(slo, ttft_s=0.11, e2e_s=0.11, completion_tokens=1)
    assert latency_met(slo, ttft_s=0.05, e2e_s=9.0, completion_tokens=1)  # no TPOT for one token
    assert not latency_met(slo, ttft_s=None, e2e_s=0.01, completion_tokens=0)


def test_members_count_from_the_groups_first_arrival() -> None:
    groups = CompoundGroups()
    first = groups.arrive("t", group_slo(), now=10.0)
    second = groups.arrive("t", group_slo(), now=10.8)
    assert first == second == 10.0
    # The second member took 0.3 s of its own, but the group's second is 1.1 s in.
    assert groups.finish("t", group_slo(), first, now=10.5, ok=True) == (True, None)
    assert groups.finish("t", group_slo(), second, now=11.1, ok=True) == (False, False)
    assert len(groups) == 0


def test_a_group_meets_its_slo_when_every_member_does() -> None:
    groups = CompoundGroups()
    first = [groups.arrive("t", group_slo(size=3), now=0.0 + i / 10) for i in range(3)]
    verdicts = [groups.finish("t", group_slo(size=3), f, now=0.9, ok=True) for f in first]
    assert [v.group_met for v in verdicts] == [None, None, True]


def test_a_failed_member_fails_its_group() -> None:
    groups = CompoundGroups()
    first = groups.arrive("t", group_slo(), now=0.0)
    groups.arrive("t", group_slo(), now=0.1)
    assert groups.finish("t", group_slo(), first, now=0.2, ok=False) == (False, None)
    assert groups.finish("t", group_slo(), first, now=0.3, ok=True) == (True, False)


def test_tenants_with_the_same_group_id_are_separate_groups() -> None:
    groups = CompoundGroups()
    a = groups.arrive("a", group_slo(), now=0.0)
    b = groups.arrive("b", group_slo(), now=5.0)
    assert (a, b) == (0.0, 5.0) and len(groups) == 2


def test_a_group_that_never_completes_is_missed_after_its_grace() -> None:
    groups = CompoundGroups(grace_s=5.0)
    groups.arrive("t", group_slo("sized", size=3, deadline_ms=1000.0), now=0.0)
    groups.arrive("t", group_slo("open", size=None, deadline_ms=1000.0), now=0.0)
    assert groups.expire(now=5.9) == 0 and len(groups) == 2
    assert groups.expire(now=6.1) == 1  # only a group of a stated size can be known missed
    assert len(groups) == 0


def test_a_group_without_a_size_judges_each_member_alone() -> None:
    groups = CompoundGroups()
    slo = group_slo(size=None)
    first = groups.arrive("t", slo, now=0.0)
    for now in (0.5, 0.9, 1.5):
        assert groups.finish("t", slo, first, now=now, ok=True) == (now <= 1.0, None)


def test_groups_are_bounded_and_a_forgotten_members_verdict_stands_alone() -> None:
    groups = CompoundGroups(max_groups=2)
    firsts = [groups.arrive("t", group_slo(f"g{i}"), now=float(i)) for i in range(3)]
    assert len(groups) == 2
    assert groups.finish("t", group_slo("g0"), firsts[0], now=0.5, ok=True) == (True, None)


def test_group_size_belongs_to_a_compound_slo() -> None:
    with pytest.raises(ValueError, match="compound"):
        Slo(SloKind.DEADLINE, deadline_ms=100.0, group_size=2)
    with pytest.raises(ValueError, match=">= 1"):
        group_slo(size=0)
