"""The latency targets a request's SLO sets, in seconds: what admission, the running limit and
the compute-split controller measure each request against. A request that stated no SLO
carries the server's default one (ingress fills it in), so every request has targets."""

from duetserve.proto.scheduling import Slo, SloKind
from duetserve.services.scheduler.state import SloTargets


def ttft_target_s(slo: Slo | None) -> float | None:
    """Its first token's target: a latency SLO's TTFT; a deadline (plain or a group's) bounds
    the first token too."""
    if slo is None:
        return None
    if slo.kind == SloKind.LATENCY and slo.ttft_ms is not None:
        return slo.ttft_ms / 1000
    if slo.deadline_ms is not None:
        return slo.deadline_ms / 1000
    return None


def tpot_target_s(slo: Slo | None) -> float | None:
    """Its target per output token after the first; only a latency SLO has one."""
    if slo is None or slo.kind != SloKind.LATENCY or slo.tpot_ms is None:
        return None
    return slo.tpot_ms / 1000


def slo_targets(slo: Slo | None, arrival: float, group_age_s: float = 0.0) -> SloTargets | None:
    """What a policy measures the request against; `arrival` on the scheduler's clock, from
    which a deadline counts; a compound member's from its group's first arrival, `group_age_s`
    earlier (ingress, which judges the group, says how long: SubmitRequest.group_age_s)."""
    if slo is None:
        return None
    start = arrival - group_age_s if slo.kind == SloKind.COMPOUND else arrival
    deadline_at = None if slo.deadline_ms is None else start + slo.deadline_ms / 1000
    if slo.kind == SloKind.LATENCY:
        return SloTargets(ttft_target_s(slo), tpot_target_s(slo), None)
    return SloTargets(None, None, deadline_at)


def compound_group(slo: Slo | None, tenant: str) -> str:
    """A compound member's group as the scheduler keys it: scoped by its tenant, so two
    tenants' groups of the same name are two groups. "" for any other request."""
    if slo is None or slo.kind != SloKind.COMPOUND or slo.group is None:
        return ""
    return f"{tenant}\x00{slo.group}"
