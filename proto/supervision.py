"""Launcher -> anyone: what the local supervisor (`make run`'s launcher) knows of its services.

The launcher publishes a SupervisorReport on LAUNCHER_REPORT every few seconds and after every
restart; ingress serves the restart counts at /metrics (duet_service_restarts_total). Under
Kubernetes or Nomad nothing publishes it: the orchestrator restarts and counts.
"""

from dataclasses import dataclass

from duetserve.proto.codec import message
from duetserve.proto.subjects import ROOT

LAUNCHER_REPORT = f"{ROOT}.launcher.report"


@message("launcher.report")
@dataclass(frozen=True, slots=True)
class SupervisorReport:
    launcher: str  # the launcher's instance name: counts restart from 0 with a new one
    restarts: dict[str, int]  # service (or "nats-server") -> restarts since the launcher began
    pids: dict[str, int]  # service -> the pid serving it now (absent: not running)
