"""The real thing: ``flwr run .`` of the offline default, as a user runs it.

Flower starts a local SuperLink in the background and simulates the SuperNodes. The
CLI returns before the run ends (and ``--stream`` exits 0 even when the ServerApp
crashed), so this test trusts only the run's JSON status and the results file. It uses
a throwaway ``FLWR_HOME``, unique ports, and ends the SuperLink it started by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).with_name("flwr"))
RUN_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flwr_json(args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(
        [FLWR, *args, "--format", "json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    start = out.stdout.find("{")
    if start < 0:
        raise AssertionError(f"flwr {args} printed no JSON:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout[start:])


def _superlink_pids(flwr_home: Path) -> list[int]:
    listing = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True
    ).stdout
    pids = []
    for line in listing.splitlines():
        pid, _, args = line.strip().partition(" ")
        if str(flwr_home) in args and "flower-superlink" in args:
            pids.append(int(pid))
    return pids


def _stop_local_superlink(flwr_home: Path) -> None:
    """End the background SuperLink this FLWR_HOME started (its superexec follows it)."""
    deadline = time.monotonic() + 30
    while (pids := _superlink_pids(flwr_home)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if time.monotonic() < deadline - 15 else signal.SIGKILL)
        time.sleep(1)
    assert not _superlink_pids(flwr_home), "the local SuperLink survived SIGTERM and SIGKILL"


@pytest.mark.slow
def test_flwr_run_offline_default_completes_with_results(
    digits_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: an isolated Flower home, unique ports, no runtime dependency installation
    flwr_home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    out_dir = tmp_path / "runs"
    overrides = (
        f"num-server-rounds=2 min-nodes=3 output-dir='{out_dir}' run-name='ci' "
        f"state-dir='{tmp_path / 'state'}'"
    )
    try:
        # Execute
        submitted = _flwr_json(
            ["run", ".", "--run-config", overrides, "--federation-config", "num-supernodes=3"], env
        )
        assert submitted.get("success") is True, submitted
        run_id = submitted["run-id"]
        deadline, status = time.monotonic() + RUN_TIMEOUT_S, "pending"
        while time.monotonic() < deadline and not status.startswith("finished"):
            time.sleep(5)
            listed = _flwr_json(["list", "--run-id", str(run_id)], env)
            status = listed["runs"][0]["status"] if listed.get("success") else status
    finally:
        _stop_local_superlink(flwr_home)

    # Assert: the run's own status, then the results it wrote
    assert status == "finished:completed", f"run {run_id} ended as {status!r}"
    doc = json.loads((out_dir / "ci" / "results.json").read_text())
    assert doc["status"] == "completed"
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["accepted"] == 3 for r in doc["rounds"])
