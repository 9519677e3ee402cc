"""Whether a request met its SLO (DESIGN.md "Requests, tenants and SLOs"), judged where the
client is: from the request's arrival at ingress to its tokens leaving it.

- latency: TTFT <= ttft_ms and TPOT <= tpot_ms, TPOT as vLLM defines it, (E2E - TTFT) /
  (output tokens - 1); a one-token answer meets its TPOT trivially.
- deadline: the whole answer within deadline_ms of the request's arrival.
- compound: each member within deadline_ms of its group's FIRST arrival; the group met its SLO
  when every member did. With `group_size` the group is judged when its last member finishes;
  a group still short of members when its deadline and a grace period have passed is missed.

A request that failed never meets its SLO. Groups are kept per ingress replica (members of one
group must reach the same replica until units register groups cluster-wide), by tenant and id,
and bounded in number.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from duetserve.proto.scheduling import Slo, SloKind

GROUP_GRACE_S = 60.0  # an unfinished group is forgotten this long after its deadline
MAX_GROUPS = 65_536  # groups kept at once; the oldest is forgotten first


class SloOutcome(NamedTuple):
    """What a finished request reports about its SLO (the `duet.slo` of its usage)."""

    kind: SloKind
    met: bool
    stated: bool  # the request's own SLO; False: the server's default

    def body(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "met": self.met, "default": not self.stated}


def latency_met(slo: Slo, ttft_s: float | None, e2e_s: float, completion_tokens: int) -> bool:
    """A latency SLO's verdict on a finished answer (None: no token ever came)."""
    if ttft_s is None:
        return False
    if slo.ttft_ms is not None and ttft_s * 1000 > slo.ttft_ms:
        return False
    if completion_tokens < 2 or slo.tpot_ms is None:
        return True
    return (e2e_s - ttft_s) / (completion_tokens - 1) * 1000 <= slo.tpot_ms


@dataclass(slots=True)
class _Group:
    first_s: float  # monotonic arrival of its first member
    deadline_s: float
    size: int | None
    finished: int = 0
    all_met: bool = True


class GroupVerdict(NamedTuple):
    member_met: bool
    group_met: bool | None  # None: the group is not complete yet (or its size is unknown)


class CompoundGroups:
    """The compound groups this ingress has seen: when each one's first member arrived, how
    many have finished and whether all of them met the shared deadline. Pure (the caller gives
    the time)."""

    def __init__(self, grace_s: float = GROUP_GRACE_S, max_groups: int = MAX_GROUPS) -> None:
        self._grace_s = grace_s
        self._max_groups = max_groups
        self._groups: OrderedDict[tuple[str, str], _Group] = OrderedDict()  # by first arrival

    def __len__(self) -> int:
        return len(self._groups)

    def arrive(self, tenant: str, slo: Slo, now: float) -> float:
        """A member arrived: the monotonic time its group's deadline counts from."""
        key = (tenant, slo.group or "")
        group = self._groups.get(key)
        if group is None:
            assert slo.deadline_ms is not None  # Slo checks a compound SLO has one
            group = _Group(now, slo.deadline_ms / 1000, slo.group_size)
            self._groups[key] = group
            while len(self._groups) > self._max_groups:
                self._groups.popitem(last=False)
        return group.first_s

    def finish(self, tenant: str, slo: Slo, first_s: float, now: float, ok: bool) -> GroupVerdict:
        """A member finished (ok) or failed, `first_s` being what `arrive` gave it: its own
        verdict, and the group's once complete."""
        assert slo.deadline_ms is not None
        member_met = ok and now - first_s <= slo.deadline_ms / 1000
        key = (tenant, slo.group or "")
        group = self._groups.get(key)
        if group is None:  # forgotten (past its grace, or evicted): the member alone
            return GroupVerdict(member_met, None)
        group.finished += 1
        group.all_met = group.all_met and member_met
        if group.size is None or group.finished < group.size:
            return GroupVerdict(member_met, None)
        del self._groups[key]
        return GroupVerdict(member_met, group.all_met)

    def expire(self, now: float) -> int:
        """Forget the groups past their deadline and grace; the number of those with a known
        size that never completed (each a missed group)."""
        missed = 0
        while self._groups:
            key, group = next(iter(self._groups.items()))
            # Deadlines differ between groups, so one still live at the front may hide an
            # expired one behind it; it is found once the front one goes (bounded by grace).
            if now - group.first_s <= group.deadline_s + self._grace_s:
                break
            del self._groups[key]
            missed += group.size is not None
        return missed
