"""The key-exchange stages must stay light: the package never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_lazy_package_names_every_public_name_and_resolves_it() -> None:
    import dpfpl_app.secagg as secagg

    assert sorted(secagg.__all__) == sorted(secagg._HOMES)
    for name in secagg.__all__:
        assert getattr(secagg, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
        secagg.Nonexistent  # noqa: B018
