"""Settings every service shares, read from the environment once, at the entrypoint.

A service subclasses `CommonSettings` with its own fields, builds it in `__main__` and passes
it (or the parts it needs) down. Nothing below an entrypoint reads `os.environ`: code that
needs a setting takes it as an argument, so tests build settings directly.

Every field is read from `DUET_<FIELD>` (case-insensitive), except the OpenTelemetry endpoint,
which also answers to the standard `OTEL_EXPORTER_OTLP_ENDPOINT`.
"""

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from duetserve.common.nats_auth import NatsAccess, access
from duetserve.common.serving_config import Dtype, Mode, resolve_auto_fields

# How a unit runs its two phases (DESIGN.md, "Modes"), `Mode`:
# - semi-pd: a prefill and a decode worker on their compute shares of one device, sharing one
#   KV pool and one copy of the weights;
# - unified: one worker runs prefill chunks and decode steps in the same forward pass;
# - disagg: a prefill and a decode worker, each with its own KV pool and weight copy; a
#   request's KV is copied from the prefill pool to the decode pool when decode admits it.
# `auto` (the default of DUET_MODE and DUET_DTYPE) is the measured best for this device; see
# common/serving_config.py.
__all__ = ["CommonSettings", "Dtype", "Mode", "ServingSettings", "default_instance_name"]


class CommonSettings(BaseSettings):
    """Connection, logging, tracing and lifecycle settings of one service process."""

    model_config = SettingsConfigDict(env_prefix="DUET_", extra="ignore", populate_by_name=True)

    nats_url: str = "nats://127.0.0.1:4222"
    # Where each role's NATS credentials are (common/nats_auth.py); unset: connect without any.
    # The launcher sets it for the services it starts.
    nats_credentials_dir: Path | None = None
    # The CA that signed the NATS server's certificate: the connection is TLS, verified by it.
    nats_tls_ca: Path | None = None
    # Name of this process among replicas of the same service; see `instance_name`.
    instance: str | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Print finished spans to stdout (debugging only; benchmarks keep this off).
    trace_console: bool = False
    # Base URL of an OTLP/HTTP collector, e.g. http://127.0.0.1:4318; tracing is off without it.
    otel_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "DUET_OTEL_ENDPOINT"),
    )
    start_timeout_s: float = Field(default=60.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, gt=0)
    stop_timeout_s: float = Field(default=10.0, gt=0)
    # Default timeout of a NATS request when the caller gives none.
    request_timeout_s: float = Field(default=5.0, gt=0)
    # Set by a parent that spawned this process (kv_manager, for a replacement worker): the
    # process ends when that parent does (processes.die_with).
    parent_pid: int | None = Field(default=None, gt=0)

    def nats_access(self, role: str) -> NatsAccess:
        """How a process of `role` connects to the bus (its credentials, inbox and TLS)."""
        return access(role, self.nats_credentials_dir, self.nats_tls_ca)

    def instance_name(self, service: str) -> str:
        """The configured instance name, or `<service>-<hostname>-<pid>`."""
        return self.instance or default_instance_name(service)


class ServingSettings(CommonSettings):
    """Settings of the processes that must agree on how the unit runs: its mode, and the dtype
    of its weights and KV pool. DUET_MODE / DUET_DTYPE may say `auto`; they are resolved when
    the settings are parsed, so the fields always hold a concrete value."""

    mode: Mode = "semi-pd"  # DUET_MODE; unset or `auto`: see serving_config.choose
    dtype: Dtype = "float32"  # DUET_DTYPE; likewise
    # DUET_HOST_KV_MB: the host tier's size in MiB (kv.HOST_POOL: KV blocks in a host memory
    # region of their own, which preempted requests' KV is swapped to and back from); 0: no
    # host tier, and preemption recomputes.
    host_kv_mb: float = Field(0.0, ge=0)
    # Why `auto` became what it did (filled in when parsing; None when both were set by hand).
    auto_choice: str | None = Field(default=None, exclude=True)

    _resolve_auto = model_validator(mode="before")(resolve_auto_fields)


def default_instance_name(service: str) -> str:
    """A name unique among the processes of one cluster: service, host and process id."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}"
