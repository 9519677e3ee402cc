"""Launcher settings (DUET_ prefix). Every DUET_ variable also reaches the services it starts."""

from pathlib import Path

from pydantic import Field

from duetserve.common.settings import ServingSettings


class LauncherSettings(ServingSettings):
    model: Path | None = None  # DUET_MODEL; SmolLM2-135M-Instruct (converted once) when unset
    models_dir: Path = Path("models")
    var_dir: Path = Path(".var")  # NATS store and logs, project-local
    port: int = Field(8000, ge=1, le=65535)  # DUET_PORT: the API
    nats_port: int = Field(4222, ge=0, le=65535)  # 0 picks a free one
    # `mode` and `dtype` (ServingSettings, DUET_MODE / DUET_DTYPE, `auto` by default): the
    # launcher resolves `auto` once and passes the concrete values to every service.
    ready_timeout_s: float = Field(120.0, gt=0)
