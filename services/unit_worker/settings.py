"""Settings both workers of a unit share (DUET_ prefix), parsed once at each entrypoint."""

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from duetserve.common.settings import ServingSettings
from duetserve.runtime.compute_share import BackendPreference


class UnitWorkerSettings(ServingSettings):
    unit: str = "unit0"
    # `mode` (ServingSettings): semi-pd: a prefill and a decode worker side by side on their
    # compute shares; unified: the prefill worker runs both phases in one forward pass per
    # step (chunked prefill) on the whole device, and no decode worker is started; disagg: as
    # semi-pd, but the decode worker maps its own pool and weights and copies each admitted
    # request's KV into it.
    sampler_seed: int = 0  # randomness of unseeded requests
    # Decoding (the decode worker; the prefill worker in unified mode)
    max_resident: int = Field(256, gt=0)  # requests decoding at once
    growth_blocks: int = Field(4, gt=0)  # blocks taken per allocation, ahead of need
    heartbeat_interval_s: float = Field(1.0, gt=0)
    needs_blocks_repeat_s: float = Field(0.5, gt=0)  # re-ask for a preemption this often
    # KVShare's decode stage, for requests whose prompt reused cached spans: every
    # span_recheck_interval tokens (0: never), the span_recheck_top reused tokens the newest
    # attends to most are computed again up to span_recheck_layer (-1: two thirds of the
    # model's depth), and those deviating there beyond span_recheck_threshold (relative
    # squared distance) are recomputed in every layer. A recheck costs about two batch-1
    # decode steps and runs per request (docs/benchmarks.md, "KVShare"): the interval is long.
    span_recheck_interval: int = Field(32, ge=0)
    span_recheck_top: int = Field(16, gt=0)
    span_recheck_threshold: float = Field(0.01, ge=0)
    span_recheck_layer: int = Field(-1, ge=-1)
    # A model call (a prefill batch, a decode step, a share change) running longer than this
    # means the model thread is stuck: the worker stops, and its supervisor starts it again.
    model_call_timeout_s: float = Field(300.0, gt=0)
    step_log_dir: Path | None = None  # a JSON line per model step (see unit_worker/step_log)
    # How the unit's device is split between its workers (runtime/compute_share): a backend
    # name, or auto (the best this machine has; one log line says which and why).
    compute_share: BackendPreference = "auto"
    # The prefill worker's fraction of the device at start; the scheduler's controller (or
    # an operator, on the unit's compute split subject) moves it while serving.
    prefill_share: float = Field(0.5, gt=0.0, lt=1.0)
    # The CPU cores of the unit, e.g. "0-3" or "0,2,4"; default: the cores this process may
    # use.
    unit_cores: str | None = None
    cgroup_period_us: int = Field(100_000, ge=1_000, le=1_000_000)  # cpu-cgroup's CFS period
    # cpu-cgroup: "weight" (work-conserving: a worker uses the cores the other leaves idle) or
    # "quota" (a hard cap per CFS period)
    cgroup_limit: Literal["weight", "quota"] = "weight"
    # Set by kv_manager on a replacement worker (unit_worker/handover.py): the instance it
    # takes over from once it serves.
    replaces: str | None = None

    @field_validator("unit_cores")
    @classmethod
    def _cores_parse(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cores(value)
        return value


def parse_cores(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]; a clear ValueError for anything else."""
    cores: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(f"unit_cores: {part!r} is not a core or a range like 0-3") from None
        if low < 0 or high < low:
            raise ValueError(f"unit_cores: {part!r} is not a core or a range like 0-3")
        cores.update(range(low, high + 1))
    return sorted(cores)
