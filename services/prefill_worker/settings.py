"""Prefill worker settings (DUET_ prefix), parsed once at the entrypoint."""

from duetserve.common.settings import CommonSettings


class PrefillSettings(CommonSettings):
    unit: str = "unit0"
    sampler_seed: int = 0  # randomness of unseeded requests
