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


def test_a_superlink_is_found_by_its_own_home_not_by_a_longer_one_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two SuperLinks as `ps` lists them, of homes `.flwr` and `.flwr-1`
    import subprocess

    def listed(home: str) -> str:
        return (f"/venv/bin/python /venv/bin/flower-superlink --insecure --log-file "
                f"{tmp_path}/{home}/local-superlink/superlink.log --database "
                f"{tmp_path}/{home}/local-superlink/state.db")

    ps = f" 101 {listed('.flwr')}\n 202 {listed('.flwr-1')}\n 303 /bin/sleep 5\n"
    monkeypatch.setattr(
        subprocess, "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=ps, stderr=""),
    )

    # Execute / Assert: each home finds its own SuperLink only
    assert LocalFlower(tmp_path, tmp_path / ".flwr").superlink_pids() == [101]
    assert LocalFlower(tmp_path, tmp_path / ".flwr-1").superlink_pids() == [202]
