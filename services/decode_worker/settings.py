"""Decode worker settings (DUET_ prefix), parsed once at the entrypoint."""

from duetserve.services.unit_worker.settings import UnitWorkerSettings


class DecodeSettings(UnitWorkerSettings):
    pass
