"""Suite-wide set-up.

Triton kernels run in the interpreter on machines without a GPU; the variable must be set before
triton is first imported, so it is set here, before any test module is collected."""

import os
from pathlib import Path

import pytest
import torch

from duetserve.runtime.generator.spec import ModelSpec

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> ModelDirs:
    return ModelDirs(tmp_path_factory.mktemp("models"))
