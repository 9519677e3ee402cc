"""Launcher settings (DUET_ prefix). Every DUET_ variable also reaches the services it starts."""

from pathlib import Path

from pydantic import Field

from duetserve.common.settings import CommonSettings, Mode


class LauncherSettings(CommonSettings):
    model: Path | None = None  # DUET_MODEL; the generated tiny model when unset
    models_dir: Path = Path("models")
    var_dir: Path = Path(".var")  # NATS store and logs, project-local
    port: int = Field(8000, ge=1, le=65535)  # DUET_PORT: the API
    nats_port: int = Field(4222, ge=0, le=65535)  # 0 picks a free one
    # semi-pd (prefill and decode workers, one pool, split compute), unified (one worker runs
    # both phases with chunked prefill; no decode worker) or disagg (two workers, two pools,
    # two weight copies, KV copied at the hand-off); see common.settings.Mode.
    mode: Mode = "semi-pd"
    ready_timeout_s: float = Field(120.0, gt=0)
