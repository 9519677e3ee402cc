"""Ingress never runs a model: its modules import with torch made unimportable."""

import subprocess
import sys

MODULES = (
    "duetserve.services.ingress.service",
    "duetserve.services.ingress.handlers",
    "duetserve.services.ingress.settings",
    "duetserve.common.health",
)


def test_ingress_imports_without_torch() -> None:
    script = "\n".join(
        [
            "import sys",
            "sys.modules['torch'] = None  # any `import torch` now raises ImportError",
            *(f"import {module}" for module in MODULES),
            "print('ok')",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
