"""The SLO scheduler: admission, prefill planning, hand-off to decode, preemption."""
