"""CommonSettings: DUET_ prefix, the standard OTel endpoint variable, defaults, subclasses."""

import os

import pytest
from pydantic import ValidationError

from duetserve.common.settings import CommonSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DUET_* or OTEL_* variables from the machine running the tests."""
    for name in list(os.environ):
        if name.upper().startswith(("DUET_", "OTEL_")):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = CommonSettings()
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.instance is None
    assert (settings.log_level, settings.log_format) == ("INFO", "json")
    assert settings.trace_console is False and settings.otel_endpoint is None
    assert settings.request_timeout_s == 5.0
    assert min(settings.start_timeout_s, settings.drain_timeout_s, settings.stop_timeout_s) > 0


def test_fields_read_with_duet_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUET_NATS_URL", "nats://10.0.0.5:4222")
    monkeypatch.setenv("DUET_LOG_FORMAT", "text")
    monkeypatch.setenv("DUET_TRACE_CONSOLE", "true")
    monkeypatch.setenv("DUET_DRAIN_TIMEOUT_S", "1.5")
    monkeypatch.setenv("NATS_URL", "nats://ignored:1")  # unprefixed: not ours
    settings = CommonSettings()
    assert settings.nats_url == "nats://10.0.0.5:4222"
    assert settings.log_format == "text"
    assert settings.trace_console is True
    assert settings.drain_timeout_s == 1.5


def test_otel_endpoint_from_standard_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert CommonSettings().otel_endpoint == "http://collector:4318"


def test_otel_endpoint_by_prefixed_variable_or_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUET_OTEL_ENDPOINT", "http://other:4318")
    assert CommonSettings().otel_endpoint == "http://other:4318"
    assert CommonSettings(otel_endpoint="http://given:4318").otel_endpoint == "http://given:4318"


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUET_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError):
        CommonSettings()
    monkeypatch.delenv("DUET_LOG_FORMAT")
    monkeypatch.setenv("DUET_STOP_TIMEOUT_S", "0")
    with pytest.raises(ValidationError):
        CommonSettings()


def test_instance_name_defaults_to_service_host_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings().instance_name("scheduler").endswith(f"-{os.getpid()}")
    assert CommonSettings().instance_name("scheduler").startswith("scheduler-")
    monkeypatch.setenv("DUET_INSTANCE", "sched-0")
    assert CommonSettings().instance_name("scheduler") == "sched-0"


class WorkerSettings(CommonSettings):
    max_batch: int = 8


def test_service_subclass_reads_its_own_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUET_MAX_BATCH", "32")
    monkeypatch.setenv("DUET_LOG_LEVEL", "DEBUG")
    settings = WorkerSettings()
    assert (settings.max_batch, settings.log_level) == (32, "DEBUG")
