"""Ingress settings, read once from DUET_* variables at the entrypoint.

    DUET_MODEL=/models/tiny DUET_PORT=8000 DUET_API_KEYS="k1:tenant-a" \
        python -m duetserve.services.ingress
"""

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from duetserve.common.lengths import MODEL_PATH
from duetserve.common.settings import ServingSettings
from duetserve.proto.subjects import check_token

SERVICE_NAME = "ingress"
# The services /health asks besides ingress itself (DESIGN.md's six, less ingress).
DEFAULT_HEALTH_SERVICES = (
    "scheduler",
    "prefill_worker",
    "decode_worker",
    "kv_manager",
    "cache_index",
)


class IngressSettings(ServingSettings):
    """The HTTP API's address, the model it serves, API keys, defaults and limits. (`mode`, from
    ServingSettings, only decides which services /health requires by default.)"""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)  # 0: any free port (tests)
    # The unit whose scheduler runs this ingress's requests (DUET_UNIT, as the unit's services
    # read it).
    unit: str = "unit0"
    # The model directory (tokenizer.json, config.json); DUET_MODEL.
    model: Path
    # The id clients send as `model`; the model directory's name unless set.
    served_model_name: str | None = None
    # "key1:tenant-a,key2:tenant-b"; with neither this nor the file, keys are not checked.
    api_keys: str = ""
    api_keys_file: Path | None = None
    # The SLO of a request that brings none of its own.
    default_ttft_ms: float = Field(default=1000.0, gt=0)
    default_tpot_ms: float = Field(default=100.0, gt=0)
    # Each request's output-length bound (common/lengths.py), sent to the scheduler: a LightGBM
    # text model with its card beside it (the same name, .json).
    predict_lengths: bool = True
    length_model: Path = MODEL_PATH
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # How long the scheduler has to accept or refuse a request (generation itself is unbounded).
    submit_timeout_s: float = Field(default=5.0, gt=0)
    # A stream quiet this long is asked after at the scheduler (watch.py); one whose
    # scheduler cannot be reached for stream_unreachable_s ends as lost.
    stream_quiet_s: float = Field(default=2.0, gt=0)
    stream_unreachable_s: float = Field(default=30.0, gt=0)
    # DUET_HEALTH_SERVICES="scheduler,kv_manager": what /health requires to be ready.
    health_services: Annotated[tuple[str, ...], NoDecode] = DEFAULT_HEALTH_SERVICES
    health_timeout_s: float = Field(default=1.0, gt=0)
    access_log: bool = False
    # The semantic response cache (semantic.py), run by cache_index with the same switch:
    # chat requests are looked up before they are submitted and their normally finished answers
    # stored. A lookup unanswered within semantic_lookup_timeout_s is a miss. Load (which
    # loosens thresholds and lengthens TTLs within each category's bounds) is this ingress's
    # requests in flight over semantic_full_load_requests.
    semantic_cache: bool = False
    semantic_lookup_timeout_s: float = Field(default=0.05, gt=0)
    semantic_full_load_requests: int = Field(default=64, ge=1)

    @field_validator("health_services", mode="before")
    @classmethod
    def _split_services(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("health_services")
    @classmethod
    def _check_services(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            check_token(name, "service")
        return value

    @model_validator(mode="after")
    def _unified_runs_no_decode_worker(self) -> "IngressSettings":
        if "health_services" not in self.model_fields_set and self.mode == "unified":
            self.health_services = tuple(s for s in self.health_services if s != "decode_worker")
        return self

    @property
    def model_id(self) -> str:
        """The served model id: DUET_SERVED_MODEL_NAME, else the model directory's name."""
        return self.served_model_name or self.model.resolve().name
