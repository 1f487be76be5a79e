"""The real thing: ``flwr run .`` of the offline default, as a user runs it.

Flower starts a local SuperLink in the background and simulates the SuperNodes. The
CLI returns before the run ends (and ``--stream`` exits 0 even when the ServerApp
crashed), so this test trusts only the run's JSON status and the results file. It uses
a throwaway ``FLWR_HOME``, unique ports, and ends the SuperLink it started by PID.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpfpl_app.federation.flwr_local import LocalFlower

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600


@pytest.mark.slow
def test_flwr_run_offline_default_completes_with_results(
    digits_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: an isolated Flower home, unique ports, no runtime dependency installation
    out_dir = tmp_path / "runs"
    overrides = {
        "num-server-rounds": 2,
        "min-nodes": 3,
        "output-dir": str(out_dir),
        "run-name": "ci",
        "state-dir": str(tmp_path / "state"),
    }

    # Execute: LocalFlower ends the SuperLink it started by PID on exit, pass or fail
    with LocalFlower(REPO, tmp_path / "flwr-home") as flower:
        run_id, status = flower.run(overrides, num_supernodes=3, timeout_s=RUN_TIMEOUT_S)
        log = flower.log(run_id)
    assert not flower.superlink_pids(), "the local SuperLink outlived the test"

    # Assert: the run's own status, then the results it wrote
    assert status == "finished:completed", f"run {run_id} ended as {status!r}"
    doc = json.loads((out_dir / "ci" / "results.json").read_text())
    assert doc["status"] == "completed"
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["accepted"] == 3 for r in doc["rounds"])
    assert sorted(node["partition-id"] for node in doc["nodes"].values()) == [0, 1, 2]
    # the log: one copy of each line, absolute paths, the clients' own progress
    assert log.count(f"results directory: {out_dir / 'ci'}") == 1, log
    assert log.count("round 2/2  local-acc") == 1, log
    assert "loaded frozen CLIP" in log, log
    # every exchange went through the simulation's message window (polling_grid)
    assert "messages in flight (message-window auto)" in log, log
