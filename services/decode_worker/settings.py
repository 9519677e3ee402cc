"""Decode worker settings (DUET_ prefix), parsed once at the entrypoint."""

from pydantic import Field

from duetserve.services.unit_worker.settings import UnitWorkerSettings


class DecodeSettings(UnitWorkerSettings):
    max_resident: int = Field(256, gt=0)  # requests decoding at once
    growth_blocks: int = Field(4, gt=0)  # blocks taken per allocation, ahead of need
    heartbeat_interval_s: float = Field(1.0, gt=0)
    needs_blocks_repeat_s: float = Field(0.5, gt=0)  # re-ask for a preemption this often
