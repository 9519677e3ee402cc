"""Decode worker settings (DUET_ prefix), parsed once at the entrypoint."""

from pydantic import Field

from duetserve.common.settings import CommonSettings


class DecodeSettings(CommonSettings):
    unit: str = "unit0"
    sampler_seed: int = 0  # randomness of unseeded requests
    max_resident: int = Field(256, gt=0)  # requests decoding at once
    growth_blocks: int = Field(4, gt=0)  # blocks taken per allocation, ahead of need
    heartbeat_interval_s: float = Field(1.0, gt=0)
    needs_blocks_repeat_s: float = Field(0.5, gt=0)  # re-ask for a preemption this often
