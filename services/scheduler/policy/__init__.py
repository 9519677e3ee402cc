"""Scheduling policies (policy/base.py says what one decides), chosen by DUET_POLICY."""

from duetserve.services.scheduler.policy.base import Policy
from duetserve.services.scheduler.policy.fairness import FairPolicy
from duetserve.services.scheduler.policy.fcfs import FcfsPolicy
from duetserve.services.scheduler.policy.hit_rate import HitRatePolicy
from duetserve.services.scheduler.policy.jitserve import JitServePolicy
from duetserve.services.scheduler.policy.spf import ShortestPredictedFirstPolicy

POLICIES = {"fcfs": FcfsPolicy, "jitserve": JitServePolicy, "spf": ShortestPredictedFirstPolicy}


FAIRNESS = ("none", "vtc")


GROUPS = ("limit", "measured")


def make_policy(
    name: str,
    fairness: str = "none",
    block_size: int = 16,
    group: str = "limit",
    hit_rate: bool = False,
) -> Policy:
    """The policy `name`; with `hit_rate`, waiting requests that can wait go by their cache
    hit rate (policy/hit_rate.py); with fairness "vtc", between tenants by their virtual token
    counters and by the rest within each (policy/fairness.py). `group`: how JITServe sizes its
    group (policy/jitserve.py)."""
    if group not in GROUPS:
        raise ValueError(f"unknown group sizing {group!r}: one of {', '.join(GROUPS)}")
    if name == "jitserve":
        policy: Policy = JitServePolicy(group=group)
    elif name in POLICIES:
        policy = POLICIES[name]()
    else:
        raise ValueError(f"unknown policy {name!r}: one of {', '.join(POLICIES)}")
    if hit_rate:
        policy = HitRatePolicy(policy)
    if fairness == "vtc":
        return FairPolicy(policy, block_size)
    if fairness != "none":
        raise ValueError(f"unknown fairness {fairness!r}: one of {', '.join(FAIRNESS)}")
    return policy
