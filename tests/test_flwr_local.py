"""LocalFlower: the environment its runs inherit, and waiting out a loaded machine."""

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


class _Answers:
    """``flwr`` answers in order, as ``LocalFlower._json`` would return or raise them."""

    def __init__(self, *answers: dict | Exception) -> None:
        self.answers, self.asked = list(answers), []

    def __call__(self, args: list[str]) -> dict:
        self.asked.append(args[0])
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class _Clock:
    """A clock that moves only when slept on, and runs hooks when it passes their time."""

    def __init__(self) -> None:
        self.now, self.hooks = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for at, hook in [h for h in self.hooks if h[0] <= self.now]:
            self.hooks.remove((at, hook))
            hook()


def _quiet(monkeypatch: pytest.MonkeyPatch, flower: LocalFlower, answers: _Answers) -> _Clock:
    from dpfpl_app.federation import flwr_local

    clock = _Clock()
    monkeypatch.setattr(flwr_local.time, "sleep", clock.sleep)
    monkeypatch.setattr(flwr_local.time, "monotonic", lambda: clock.now)
    monkeypatch.setattr(flower, "superlink_pids", lambda: [])
    monkeypatch.setattr(flower, "_json", answers)
    return clock


def test_a_superlink_slow_to_start_and_a_failed_poll_do_not_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: flwr's 15-s start fails once, then a status poll's CLI call breaks once
    import subprocess

    flower = LocalFlower(tmp_path, tmp_path / "home")
    slow = {"success": False, "error-message": "Failed to start local SuperLink within 15s."}
    answers = _Answers(
        slow,
        {"success": True, "runs": []},
        {"success": True, "run-id": "7"},
        subprocess.TimeoutExpired("flwr", 180),
        {"success": True, "runs": [{"status": "running"}]},
        {"success": True, "runs": [{"status": "finished:completed"}]},
    )
    _quiet(monkeypatch, flower, answers)

    # Execute
    outcome = flower.run({"seed": 0}, num_supernodes=2, timeout_s=600)

    # Assert: the start was asked for again and the run was waited for to its end
    assert outcome == (7, "finished:completed")
    assert answers.asked == ["list", "list", "run", "list", "list", "list"]


def test_a_run_is_asked_about_when_the_superlink_logs_its_end_and_seldom_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a run whose ServerApp task ends at 95 s, when the SuperLink logs it
    flower = LocalFlower(tmp_path, tmp_path / "home")
    clock = _quiet(monkeypatch, flower, _Answers())
    asked_at: list[float] = []

    def flwr(args: list[str]) -> dict:
        if args[0] == "run":
            return {"success": True, "run-id": "7"}
        if "--run-id" in args:
            asked_at.append(clock.now)
            status = "finished:completed" if clock.now >= 95 else "running"
            return {"success": True, "runs": [{"status": status}]}
        return {"success": True, "runs": []}

    monkeypatch.setattr(flower, "_json", flwr)
    log = tmp_path / "home" / "local-superlink" / "superlink.log"
    log.parent.mkdir(parents=True)
    log.write_text("INFO | Started task 3 of run 7\nINFO | Finished task 2 of run 71\n")

    def ends() -> None:
        with log.open("a") as out:
            out.write("INFO | runtime_handlers.py:357 | Finished task 3 of run 7\n")

    clock.hooks.append((95.0, ends))

    # Execute
    outcome = flower.run({"seed": 0}, num_supernodes=2, timeout_s=600)

    # Assert: before the line the CLI was asked once per 30 s, not every few seconds
    # (another run's line did not count); the line was acted on within a second
    assert outcome == (7, "finished:completed")
    assert asked_at == [30.0, 60.0, 90.0, 95.0]


def test_a_superlink_that_never_starts_fails_with_where_to_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpfpl_app.federation import flwr_local

    flower = LocalFlower(tmp_path, tmp_path / "home")
    _quiet(monkeypatch, flower, _Answers(*[RuntimeError("flwr list printed no JSON")] * 3))
    monkeypatch.setattr(flwr_local, "STARTUP_S", 0.0)

    with pytest.raises(RuntimeError, match=r"did not start .*local-superlink/superlink\.log"):
        flower.run({"seed": 0}, num_supernodes=2, timeout_s=600)


def test_a_port_taken_before_the_superlink_binds_it_is_replaced(tmp_path: Path) -> None:
    # Prepare: something else listens on the port this home picked for its SuperLink
    import socket

    flower = LocalFlower(tmp_path, tmp_path / "home")
    taken = int(flower.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            # Execute: a real `flwr` starts the real SuperLink
            flower.start_superlink()

            # Assert: it came up, on another port, and `flwr` finds it there (one SuperLink
            # of this home: the list did not start a second)
            port = int(flower.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
            assert port != taken
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            assert flower._json(["list"]).get("success") is True
            assert len(flower.superlink_pids()) == 1
        finally:
            flower.stop()
    assert not flower.superlink_pids()


def test_a_state_database_left_broken_by_a_killed_start_cannot_stop_the_superlink(
    tmp_path: Path,
) -> None:
    # Prepare: the home holds what a SuperLink SIGKILLed while creating its schema left
    # (measured: an empty migration record and the first table); Flower then fails every
    # start with "table node already exists"
    import sqlite3

    flower = LocalFlower(tmp_path, tmp_path / "home")
    broken = tmp_path / "home" / "local-superlink" / "state.db"
    broken.parent.mkdir(parents=True)
    with sqlite3.connect(broken) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        db.execute("CREATE TABLE node (node_id INTEGER)")
    try:
        # Execute: a real `flwr` starts the real SuperLink of this home
        flower.start_superlink()

        # Assert: it is up and keeps its state in memory, so no file can break a start
        assert flower._json(["list"]).get("success") is True
        pids = flower.superlink_pids()
        assert len(pids) == 1
        assert "--database" not in Path(f"/proc/{pids[0]}/cmdline").read_text()
    finally:
        flower.stop()
    assert not flower.superlink_pids()


@pytest.mark.parametrize("ray_failed", [True, False])
def test_only_a_run_that_ray_failed_to_start_is_submitted_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_failed: bool
) -> None:
    # Prepare: the first run fails; its log says Ray did not start, or something else
    from dpfpl_app.federation.flwr_local import RAY_START_FAILURE

    flower = LocalFlower(tmp_path, tmp_path / "home")
    answers = _Answers(
        {"success": True, "runs": []},
        {"success": True, "run-id": "7"},
        {"success": True, "runs": [{"status": "finished:failed"}]},
        {"success": True, "runs": []},
        {"success": True, "run-id": "8"},
        {"success": True, "runs": [{"status": "finished:completed"}]},
    )
    _quiet(monkeypatch, flower, answers)
    why = f"Exception: {RAY_START_FAILURE}." if ray_failed else "ValueError: bad shape"
    monkeypatch.setattr(flower, "log", lambda run_id: {7: why}[run_id])

    # Execute
    outcome = flower.run({"seed": 0}, num_supernodes=2, timeout_s=600)

    # Assert: Ray's start-up deadline costs one more submission; a real failure stands
    if ray_failed:
        assert outcome == (8, "finished:completed")
        assert answers.asked == ["list", "run", "list", "list", "run", "list"]
    else:
        assert outcome == (7, "finished:failed")
        assert answers.asked == ["list", "run", "list"]
