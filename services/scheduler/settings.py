"""Scheduler settings (DUET_ prefix), parsed once at the entrypoint."""

from typing import Literal

from pydantic import Field

from duetserve.common.settings import ServingSettings


class SchedulerSettings(ServingSettings):
    unit: str = "unit0"
    # `mode` (ServingSettings): semi-pd: prefill and decode workers on their compute shares;
    # unified: one worker runs prefill chunks and decode steps in the same forward pass,
    # within one token budget; disagg: decode has its own KV pool (preemption runs against
    # it) and a static split.
    # Who runs first (scheduler/policy/): "fcfs" in arrival order; "jitserve" the most work
    # that meets its SLO per second left, by predicted output lengths, preempting for it;
    # "spf" the least work left first (predicted), blind to SLOs.
    policy: Literal["fcfs", "jitserve", "spf"] = "fcfs"
    # Between tenants: "vtc" serves the backlogged tenant with the least service first (a
    # virtual token counter), `policy` within each tenant (policy/fairness.py); "none": the
    # policy alone, across all tenants.
    fairness: Literal["none", "vtc"] = "none"
    # How many JITServe lets run at once: "limit", the running limit; "measured", the count
    # whose members meeting their SLOs at the measured step time bring the most reward
    # (policy/jitserve.py; on a CPU it loses: docs/benchmarks.md).
    jitserve_group: Literal["limit", "measured"] = "limit"
    # Waiting requests whose SLOs let them wait go by how much of their prompt the cache
    # holds, most first (KVShare's scheduling by hit rate, policy/hit_rate.py).
    hit_rate_order: bool = False
    max_prefill_tokens: int = Field(2048, gt=0)
    max_prefill_seqs: int = Field(64, gt=0)
    # Which admitted prompts a prefill batch takes first (planner.PlannerConfig): "shortest"
    # (fewest tokens left; one waiting over prefill_max_wait_s goes first), or "arrival".
    prefill_order: Literal["arrival", "shortest"] = "shortest"
    prefill_max_wait_s: float = Field(2.0, gt=0)
    max_running: int = Field(256, gt=0)
    # Admission (scheduler/admission.py): at most this many queued requests; and with "slo",
    # a running limit measured against TPOT targets, and a request expected to start later
    # than admission_factor x its TTFT target refused (429 with Retry-After at ingress).
    # "queue": the queue bound alone.
    max_waiting: int = Field(1024, gt=0)
    admission: Literal["slo", "queue"] = "slo"
    admission_factor: float = Field(1.0, gt=0)
    decode_reserve_blocks: int = Field(0, ge=0)
    prefill_timeout_s: float = Field(120.0, gt=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # The unit's compute split: the prefill worker's share at start (the workers read the same
    # DUET_PREFILL_SHARE), and whether the partition controller moves it ("slo") or not.
    prefill_share: float = Field(0.5, gt=0.0, lt=1.0)
    split_control: Literal["slo", "static"] = "slo"
    # The share of requests whose own SLOs (or the default SLO) the controller keeps, on each
    # side (TTFT, TPOT); it has no latency targets of its own.
    split_percentile: float = Field(90.0, gt=0, le=100)
    split_window_samples: int = Field(32, gt=0)  # a window closes after this many samples ...
    split_window_s: float = Field(10.0, gt=0)  # ... or this long (with a few of each)
    split_min_samples: int = Field(4, gt=0)
    split_step: float = Field(0.05, gt=0, lt=1)
    split_min_share: float = Field(0.1, gt=0, lt=1)
    split_max_share: float = Field(0.9, gt=0, lt=1)
    # After both latencies missed at a split the controller moved to, it goes back to where
    # both held and does not try that move again for this many windows.
    split_recover_block_windows: int = Field(8, ge=0)
    # KVShare: reuse the KV of cached spans found anywhere in a prompt, not only an exact
    # prefix. Approximate (docs/benchmarks.md measures how close), so off unless asked for.
    span_reuse: bool = False
    span_recompute: float = Field(0.15, ge=0.0, le=1.0)  # of reused tokens, recomputed
    span_check_layer: int = Field(1, ge=0)  # where their deviation is measured
