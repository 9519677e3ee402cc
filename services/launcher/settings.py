"""Launcher settings (DUET_ prefix). Every DUET_ variable also reaches the services it starts."""

from pathlib import Path

from pydantic import Field, model_validator

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
    unit: str = "unit0"  # DUET_UNIT, as the services read it: the unit the bus's permissions name
    # The embedded nats-server's certificate and key (PEM): set both and the bus is TLS only.
    # Clients verify it with DUET_NATS_TLS_CA, which defaults to the certificate itself.
    # DUET_SEMANTIC_CATEGORIES, as cache_index reads it: the bus lets cache_index use a
    # JetStream bucket for each of its categories (DUET_SEMANTIC_BACKEND=jetstream).
    semantic_categories: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> "LauncherSettings":
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("DUET_NATS_TLS_CERT and DUET_NATS_TLS_KEY go together")
        return self
