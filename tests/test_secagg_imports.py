"""The key-exchange stages must stay light: the package never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_package_does_not_import_torch() -> None:
    code = (
        "import sys; import dpfpl_app.secagg as s;"
        "import dpfpl_app.secagg.server, dpfpl_app.secagg.client;"
        "bad = [m for m in ('torch', 'opacus', 'transformers', 'scipy') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
