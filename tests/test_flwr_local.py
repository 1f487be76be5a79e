"""LocalFlower's environment: what every process of its runs inherits."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpfpl_app.federation.flwr_local import LocalFlower


def test_threads_reach_the_runs_environment_and_zero_is_refused(tmp_path: Path) -> None:
    flower = LocalFlower(tmp_path, tmp_path / "home", threads=1)
    assert flower.env["OMP_NUM_THREADS"] == flower.env["MKL_NUM_THREADS"] == "1"
    assert flower.env["FLWR_HOME"] == str((tmp_path / "home").resolve())

    with pytest.raises(ValueError, match="threads must be >= 1"):
        LocalFlower(tmp_path, tmp_path / "home", threads=0)


def test_without_threads_the_callers_setting_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert LocalFlower(tmp_path, tmp_path / "home").env["OMP_NUM_THREADS"] == "7"
