"""Suite-wide set-up.

Triton kernels run in the interpreter on machines without a GPU; the variable must be set before
triton is first imported, so it is set here, before any test module is collected. The serving
configuration is pinned here too (below)."""

import os
from pathlib import Path

import pytest
import torch

from duetserve.runtime.generator.spec import ModelSpec

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# DUET_MODE and DUET_DTYPE default to `auto` (the measured best for the device). Each test runs
# the configuration it was written for: semi-pd in float32 unless it says otherwise (its own
# settings or stack environment), and the tests of `auto` ask for it by name.
os.environ.setdefault("DUET_MODE", "semi-pd")
os.environ.setdefault("DUET_DTYPE", "float32")


class ModelDirs:
    """Generated model directories, written once per test session and shared by spec."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[ModelSpec, Path] = {}

    def get(self, spec: ModelSpec) -> Path:
        from duetserve.runtime.generator.build import write_model

        if spec not in self._made:
            name = f"{spec.name}-{len(self._made)}"
            self._made[spec] = write_model(spec, self.root / name, progress=lambda _: None)
        return self._made[spec]


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its PyPI package's GGUF into models/, the cache
    `make run` serves from (converted once; later sessions find it)."""
    from duetserve.runtime.gguf_convert import SMOLLM2, ensure_model

    return ensure_model(SMOLLM2, REPO_ROOT / "models").model_dir


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> ModelDirs:
    return ModelDirs(tmp_path_factory.mktemp("models"))
