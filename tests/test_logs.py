"""Log output inside a Flower app: each line once, the app's own progress shown."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import logging
import opacus  # installs a root handler on import, as in every dpfpl process
from flwr.common.logger import log
{setup}
log(logging.INFO, "flower-line-xyz")
logging.getLogger("dpfpl_app.backbones.backbone_build").info("app-progress-xyz")
logging.getLogger("dpfpl_app.data.features").warning("app-warning-xyz")
"""


def _output(setup: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(setup=setup)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return done.stdout + done.stderr


@pytest.mark.parametrize("calls", [1, 3])  # the entry points call it on every message
def test_every_line_prints_once_and_app_progress_is_visible(calls: int) -> None:
    out = _output(
        "from dpfpl_app.service.logs import route_app_logs\n" + "route_app_logs()\n" * calls
    )

    assert out.count("flower-line-xyz") == 1, out
    assert out.count("app-progress-xyz") == 1, out
    assert out.count("app-warning-xyz") == 1, out


def test_without_it_flower_lines_double_and_app_progress_is_lost() -> None:
    # the behaviour this module exists to fix; if a library update changes it, the fix
    # may no longer be needed
    out = _output("")

    assert out.count("flower-line-xyz") == 2, out
    assert out.count("app-progress-xyz") == 0, out


def test_a_users_own_root_handler_is_kept() -> None:
    out = _output(
        "import sys\n"
        "mine = logging.StreamHandler(sys.stdout)\n"
        "mine.setFormatter(logging.Formatter('mine %(message)s'))\n"
        "logging.getLogger().addHandler(mine)\n"
        "from dpfpl_app.service.logs import route_app_logs\n"
        "route_app_logs()\n"
    )

    assert "mine app-warning-xyz" in out
