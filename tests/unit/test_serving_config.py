"""DUET_MODE=auto and DUET_DTYPE=auto: the measured best configuration for the device, picked
deterministically from the committed table; what is set by hand is kept."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from duetserve.common import serving_config
from duetserve.common.serving_config import MeasuredConfig, choose, detect_device, measured_table
from duetserve.services.launcher.launcher import Launcher
from duetserve.services.launcher.settings import LauncherSettings
from duetserve.services.scheduler.settings import SchedulerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def row(mode: str, dtype: str, goodput: float, attainment: float = 0.5) -> MeasuredConfig:
    return MeasuredConfig.from_json(
        {
            "device": "cpu",
            "mode": mode,
            "dtype": dtype,
            "threads": "as measured",
            "goodput": goodput,
            "attainment": attainment,
        }
    )


TABLE = (
    row("semi-pd", "float32", 0.24),
    row("unified", "float32", 0.60),
    row("unified", "bfloat16", 1.77),
    row("semi-pd", "bfloat16", 0.90),
)


def test_auto_picks_the_highest_goodput_measured_on_the_device() -> None:
    picked = choose("auto", "auto", "cpu", TABLE)
    assert (picked.mode, picked.dtype) == ("unified", "bfloat16")
    assert "1.77 req/s" in picked.reason and "4 measured" in picked.reason


def test_what_is_set_by_hand_is_kept_and_the_rest_is_the_best_that_matches_it() -> None:
    assert (choose("auto", "float32", "cpu", TABLE).mode) == "unified"
    assert (choose("semi-pd", "auto", "cpu", TABLE).dtype) == "bfloat16"
    kept = choose("disagg", "float16", "cpu", TABLE)
    assert (kept.mode, kept.dtype) == ("disagg", "float16")
    unmeasured = choose("disagg", "auto", "cpu", TABLE)  # no disagg row: the best dtype
    assert (unmeasured.mode, unmeasured.dtype) == ("disagg", "bfloat16")


def test_a_device_with_no_measurement_keeps_semi_pd() -> None:
    picked = choose("auto", "auto", "cuda", TABLE)
    assert (picked.mode, picked.dtype) == ("semi-pd", "bfloat16")
    assert "no measurement for cuda" in picked.reason


def test_ties_break_on_attainment_then_on_the_tables_order() -> None:
    tied = (row("semi-pd", "float32", 1.0, 0.8), row("unified", "float32", 1.0, 0.9))
    assert choose("auto", "auto", "cpu", tied).mode == "unified"
    same = (row("semi-pd", "float32", 1.0), row("unified", "float32", 1.0))
    assert choose("auto", "auto", "cpu", same).mode == "semi-pd"
    assert choose("auto", "auto", "cpu", same[::-1]).mode == "unified"


def test_the_device_kind_comes_from_the_nvidia_driver_listing(tmp_path: Path) -> None:
    assert detect_device(tmp_path) == "cpu"
    gpus = tmp_path / "driver" / "nvidia" / "gpus"
    gpus.mkdir(parents=True)
    assert detect_device(tmp_path) == "cpu"  # the driver, but no GPU
    (gpus / "0000:01:00.0").mkdir()
    assert detect_device(tmp_path) == "cuda"


def test_a_table_row_with_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        row("colocated", "float32", 1.0)


def test_settings_resolve_auto_when_parsed_and_keep_explicit_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serving_config, "measured_table", lambda: TABLE)
    monkeypatch.setattr(serving_config, "detect_device", lambda: "cpu")
    monkeypatch.setenv("DUET_MODE", "auto")
    monkeypatch.setenv("DUET_DTYPE", "auto")
    settings = SchedulerSettings()
    assert (settings.mode, settings.dtype) == ("unified", "bfloat16")
    assert settings.auto_choice is not None and "measured best on cpu" in settings.auto_choice
    monkeypatch.delenv("DUET_MODE")
    monkeypatch.delenv("DUET_DTYPE")
    assert SchedulerSettings().mode == "unified"  # unset is auto
    explicit = SchedulerSettings(mode="semi-pd", dtype="float32")
    assert (explicit.mode, explicit.dtype, explicit.auto_choice) == ("semi-pd", "float32", None)
    with pytest.raises(ValidationError):
        SchedulerSettings(mode="fastest")  # type: ignore[arg-type]


def test_the_launcher_passes_the_resolved_configuration_to_every_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serving_config, "measured_table", lambda: TABLE)
    monkeypatch.setattr(serving_config, "detect_device", lambda: "cpu")
    settings = LauncherSettings(mode="auto", dtype="auto")  # type: ignore[arg-type]
    env = Launcher(settings, Path("models/x")).environment("nats://127.0.0.1:1")
    assert (env["DUET_MODE"], env["DUET_DTYPE"]) == ("unified", "bfloat16")


def test_the_committed_table_names_the_configuration_docs_report_for_this_cpu() -> None:
    table = measured_table()
    assert len([r for r in table if r.device == "cpu"]) >= 2
    picked = choose("auto", "auto", "cpu")
    docs = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    assert f"`auto` on cpu picks {picked.mode}, {picked.dtype}" in docs
