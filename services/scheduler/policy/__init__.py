"""Scheduling policies (policy/base.py says what one decides), chosen by DUET_POLICY."""

from duetserve.services.scheduler.policy.base import Policy
from duetserve.services.scheduler.policy.fcfs import FcfsPolicy
from duetserve.services.scheduler.policy.jitserve import JitServePolicy
from duetserve.services.scheduler.policy.spf import ShortestPredictedFirstPolicy

POLICIES = {"fcfs": FcfsPolicy, "jitserve": JitServePolicy, "spf": ShortestPredictedFirstPolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}: one of {', '.join(POLICIES)}") from None
