"""Scheduler settings (DUET_ prefix), parsed once at the entrypoint."""

from typing import Literal

from pydantic import Field

from duetserve.common.settings import CommonSettings


class SchedulerSettings(CommonSettings):
    unit: str = "unit0"
    policy: Literal["fcfs"] = "fcfs"
    max_prefill_tokens: int = Field(2048, gt=0)
    max_prefill_seqs: int = Field(64, gt=0)
    max_running: int = Field(256, gt=0)
    decode_reserve_blocks: int = Field(0, ge=0)
    prefill_timeout_s: float = Field(120.0, gt=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
