"""`make gpu-check`'s serving half, run on the CPU: the same checks against the stack with its
pool in CPU shared memory, so the check is known to work before a GPU ever runs it."""

from pathlib import Path

from duetserve.loadtest import gpu_serving
from tests.conftest import ModelDirs
from tests.model_specs import TINY


def test_the_serving_check_passes_on_a_healthy_stack(model_dirs: ModelDirs, tmp_path: Path) -> None:
    model = model_dirs.get(TINY)
    references = gpu_serving.reference_texts(
        model, gpu_serving.PROMPTS, gpu_serving.GREEDY_TOKENS, "cpu"
    )
    checks = gpu_serving.check_mode("unified", model, references, tmp_path / "var", "cpu")
    assert [(c.name, c.status) for c in checks] == [
        ("start", "PASS"),
        ("greedy", "PASS"),
        ("burst", "PASS"),
        ("blocks", "PASS"),
    ], checks


def test_a_wrong_reference_fails_the_greedy_check(model_dirs: ModelDirs, tmp_path: Path) -> None:
    model = model_dirs.get(TINY)
    wrong = ["not what the model says"] * len(gpu_serving.PROMPTS)
    checks = {c.name: c for c in gpu_serving.check_mode("unified", model, wrong, tmp_path, "cpu")}
    assert checks["greedy"].status == "FAIL"
    assert checks["greedy"].detail.startswith("0/3 equal")
