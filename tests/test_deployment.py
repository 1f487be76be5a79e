"""The cross-organisation deployment as real processes on loopback: the topology, honest
runs, secrets, hostile clients and the SuperLink's faults (``deploy_federation.py`` says
what runs; node crashes are in ``test_deployment_faults.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_federation import (
    NUM_NODES,
    RUN_TIMEOUT_S,
    overrides,
    results,
    state_file,
    three_organisations,
)
from deploy_processes import (
    CONNECTION,
    Federation,
    Node,
    all_text,
    hostile_app_copy,
    wait_cli,
    wait_until,
)
from priority import niceness_for, thread_niceness
from safetensors.numpy import load_file

from dpfpl_app.federation.secure_round import ABORT_CODES
from dpfpl_app.secagg import Stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, digits_backbone: Path
) -> Iterator[Federation]:
    # node 0 keeps Flower's process per message (the default), nodes 1 and 2 a worker
    with three_organisations(tmp_path_factory.mktemp("deploy"), workers=(1, 2)) as fed:
        yield fed


@pytest.fixture(scope="module")
def honest_run(federation: Federation) -> dict[str, Any]:
    """One real `flwr run . orgs` of the offline default at tiny size (1 round).

    The default ``aggregation = "auto"`` makes it a secure-aggregation round here.
    """
    run_id = federation.submit(federation.app, overrides(federation, "honest", num_server_rounds=1))
    info = federation.wait_finished(run_id, RUN_TIMEOUT_S)
    return {"run_id": run_id, "info": info, "log": federation.server_log(run_id)}


# --- issue 4: the topology, for real ---------------------------------------------------
def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    # Prepare: a node whose key was made by the script but never registered
    intruder = Node("intruder", 0, federation.root / "orgs" / "intruder")

    # Execute
    federation.start_supernode(intruder, key="intruder")
    assert intruder.process is not None
    code = intruder.process.wait(timeout=90)

    # Assert: it gave up with Flower's activation error; the SuperLink said why
    assert code != 0
    assert "Failed to activate SuperNode" in intruder.log.read_text()
    link_log = (federation.logs / "superlink-1.log").read_text()
    assert "No SuperNode found with the given public key" in link_log
    assert federation.online_node_ids() == {n.node_id for n in federation.nodes}


def test_flower_processes_run_ahead_of_the_tests_computing_beside_them(
    federation: Federation,
) -> None:
    # Flower restarts a ClientApp not started within 30 s (docs/flower-limits.md): its
    # processes must not queue behind the computing tests on a loaded machine
    if os.geteuid() != 0:
        pytest.skip("lowering a process's niceness needs root (CI runs as root)")
    session = niceness_for(real_processes=True)
    assert session < niceness_for(real_processes=False)
    assert set(thread_niceness()) == {session}
    assert federation.superlink is not None
    flower = [federation.superlink.pid] + [
        p.pid for node in federation.nodes for p in (node.process, node.superexec) if p is not None
    ]
    assert len(flower) == 6  # the SuperLink, 3 SuperNodes, 2 dpfpl-superexecs
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in flower] == [session] * 6


# --- issue 5: faults, part 1 (the SuperLink side) ----------------------------------------
def test_too_few_nodes_fails_with_a_clear_message_after_the_timeout(
    federation: Federation,
) -> None:
    # Execute: ask for one node more than exist, with a short wait
    run_id = federation.submit(
        federation.app,
        overrides(
            federation, "too-few", num_server_rounds=1, min_nodes=NUM_NODES + 1, node_wait_timeout=8
        ),
    )
    info = federation.wait_finished(run_id, 180)
    log = federation.server_log(run_id)

    # Assert
    assert info["status"] == "finished:failed", info
    assert f"only {NUM_NODES} node(s) connected after waiting 8 s, but min-nodes=4" in log
    assert results(federation, "too-few")["status"] == "failed"


def test_superlink_restart_with_database_keeps_nodes_and_history(
    federation: Federation, request: pytest.FixtureRequest
) -> None:
    """What survives a SuperLink crash when it restarts on the same ``--database``.

    Survives: registered node keys and node ids (the SuperNodes reconnect by themselves,
    no re-registration), the run history with its statuses, and the service itself (a
    new run completes). Does not survive: the run that was in progress; the restarted
    SuperLink marks it ``finished:failed`` ("No heartbeat received from the task").
    """
    # Prepare: finished runs so far, and a run in progress (its ServerApp waits for nodes)
    history = {r["run-id"]: r["status"] for r in federation.cli_json(["list", CONNECTION])["runs"]}
    interrupted = federation.submit(
        federation.app,
        overrides(
            federation,
            "interrupted",
            num_server_rounds=1,
            min_nodes=NUM_NODES + 1,
            node_wait_timeout=900,
        ),
    )
    started = re.compile(rf"Started task \d+ of run {interrupted}\b")
    wait_cli(
        lambda: bool(started.search(federation.superlink_log())),
        lambda: "waiting for nodes" in federation.server_log(interrupted),
        180,
        "a running ServerApp",
        every=2,
    )

    # Execute: crash the SuperLink (and its ServerApp), restart it on the same database
    federation.kill_superlink()
    federation.start_superlink()

    # Assert: the same registered nodes come back online without re-registering
    expected = {node.node_id for node in federation.nodes}
    wait_until(lambda: federation.online_node_ids() == expected, 120, "nodes to reconnect", every=5)
    listed = {r["run-id"]: r for r in federation.cli_json(["list", CONNECTION])["runs"]}
    for run_id, status in history.items():
        if status.startswith("finished:"):
            assert listed[run_id]["status"] == status, (run_id, listed[run_id])
    # ... a new run on the restarted SuperLink completes (the run the next tests check)
    honest = request.getfixturevalue("honest_run")
    assert honest["info"]["status"] == "finished:completed", honest["info"]
    # ... and the interrupted run is reported failed, not left running forever.
    info = federation.wait_finished(interrupted, 180)
    assert info["status"] == "finished:failed", info
    assert "No heartbeat" in info["status-details"], info


# --- issue 4 (continued) ----------------------------------------------------------------
def test_tls_and_node_auth_run_completes_withresults(
    federation: Federation, honest_run: dict[str, Any]
) -> None:
    assert honest_run["info"]["status"] == "finished:completed", honest_run["info"]
    doc = results(federation, "honest")
    assert doc["status"] == "completed"
    (round1,) = doc["rounds"]
    # against real SuperNodes the default 'auto' is secure aggregation
    assert doc["config"]["aggregation"] == "secure", doc["config"]
    assert round1["survivors"] == NUM_NODES and round1["secagg-aborted-stage"] == 0
    assert round1["accepted"] == NUM_NODES and round1["rejected"] == 0
    assert round1["eval-accepted"] == NUM_NODES
    for key in ("local-acc", "neighbour-acc", "epsilon", "update-norm"):
        assert math.isfinite(round1[key]), (key, round1[key])
    assert "train-loss" not in round1  # with DP nothing unnoised about the data is kept
    assert 0.0 <= round1["local-acc"] <= 1.0
    # Every organisation kept its private state in its own state directory.
    for node in federation.nodes:
        meta = json.loads(state_file(node, "honest", "meta.json").read_text())
        assert meta["rounds_done"] == 1 and meta["run_id"] == honest_run["run_id"]
    # Nodes 1 and 2 answered through their workers: a 0600 socket in a 0700 directory
    # (no port); node 0, without node-worker=true, started none.
    for node in federation.nodes[1:]:
        (sock,) = (node.state_dir / "workers").glob("*.sock")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600, oct(sock.stat().st_mode)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert not (federation.nodes[0].state_dir / "workers").exists()
    # Their ClientApps were forked by dpfpl-superexec's zygote, one per message (a
    # signed secure round and its evaluation: 6 each); node 0's Flower spawned its own.
    for node in federation.nodes[1:]:
        forks = re.findall(r"forked the ClientApp of task \d+", node.superexec_log.read_text())
        assert len(forks) >= 6, (node.name, forks)
    assert not list(federation.nodes[0].root.glob("superexec-*.log"))


# --- issue 7: secrets stay secret -------------------------------------------------------
def test_no_key_material_or_local_prompt_in_logs_orresults(
    federation: Federation, honest_run: dict[str, Any]
) -> None:
    # Prepare: every secret, and every file a third party could see
    certs = federation.certs
    secret_files = [certs / "ca.key", certs / "superlink.key"]
    secret_files += [certs / node.name for node in federation.nodes]
    secret_files += [certs / f"superexec-{node.name}.secret" for node in federation.nodes[1:]]
    needles = {f"{p.name}: key line": line for p in secret_files for line in _key_body(p)}
    for node in federation.nodes:
        for key, tensor in load_file(state_file(node, "honest", "private.safetensors")).items():
            flat = tensor.reshape(-1)
            start = int((abs(flat) > 1e-4).argmax())  # skip leading zeros: they match anything
            if abs(flat[start]) <= 1e-4 or flat.size - start < 8:
                continue
            needles[f"{node.name} {key} (raw)"] = flat[start : start + 8].tobytes()
            needles[f"{node.name} {key} (text)"] = f"{float(flat[start]):.6g}"
    assert any("local_prompt" in what for what in needles), sorted(needles)
    exposed = all_text(
        [federation.logs, federation.runs, *(n.root for n in federation.nodes if n.root.exists())]
    )
    # State directories hold the local prompts by design; everything else must not,
    # including the node workers' logs kept beside them.
    exposed = {p: b for p, b in exposed.items() if "state" not in p.parts or "workers" in p.parts}
    assert any("workers" in p.parts for p in exposed), "no node worker log was scanned"

    # Execute / Assert: no secret in any log, result or node log
    assert exposed, "nothing to scan"
    for path, content in exposed.items():
        for what, needle in needles.items():
            data = needle if isinstance(needle, bytes) else needle.encode()
            assert data not in content, f"{what} found in {path}"
    # The SuperLink database never holds a local prompt (only the global-prompt gradient).
    for path, content in all_text([federation.database.parent]).items():
        for what, needle in needles.items():
            if isinstance(needle, bytes):
                assert needle not in content, f"{what} found in the SuperLink's {path.name}"
    # Keys are 0600, and so is every private state file.
    for path in secret_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for node in federation.nodes:
        for name in ("private.safetensors", "meta.json"):
            path = state_file(node, "honest", name)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def _key_body(path: Path) -> list[str]:
    """The base64 lines of a PEM / OpenSSH private key (the secret part)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    body = [line for line in lines if line and not line.startswith("-----")]
    assert body, path
    return body


# --- issue 6: hostile or broken clients -------------------------------------------------
def test_hostile_replies_are_excluded_logged_and_clipped(
    federation: Federation, tmp_path: Path
) -> None:
    # Prepare: the hostile ClientApp (a copy of the project) on the same SuperNodes
    app = hostile_app_copy(tmp_path / "hostile-app")
    clip_norm = 10.0
    ids = {node.partition_id: node.node_id for node in federation.nodes}

    # Execute
    # plain aggregation: the per-reply checks under test need each reply in clear; the
    # evaluation (honest in this app) runs once, after the last round, to save 3 messages
    run_id = federation.submit(
        app,
        overrides(
            federation, "hostile", num_server_rounds=2, clip_norm=clip_norm,
            aggregation="'plain'", evaluate_every=2,
        ),
    )
    info = federation.wait_finished(run_id, RUN_TIMEOUT_S)
    log = federation.server_log(run_id)

    # Assert: the run completed, each refusal is logged with the node and the reason
    assert info["status"] == "finished:completed", info
    expected = [
        (1, ids[1], r"refused reply from node {}: .*has shape \(15, \d+\), expected \(16, \d+\)"),
        (1, ids[2], r"refused reply from node {}: .*contains NaN or Inf"),
        (1, ids[0], r"node {} sent a gradient no clipped batch can produce .*re-clipped"),
        (2, ids[1], r"refused reply from node {}: unexpected array keys \['leaked-"),
        (2, ids[2], r"refused reply from node {}: error reply .*deliberate failure in train"),
    ]
    for round_, node_id, pattern in expected:
        assert re.search(f"train round {round_}: " + pattern.format(node_id), log), pattern
    doc = results(federation, "hostile")
    assert doc["status"] == "completed"
    for row in doc["rounds"]:
        assert (row["accepted"], row["rejected"]) == (1, 2), row
        assert math.isfinite(row["update-norm"]), row
    # p_G stayed finite through both hostile rounds: the accuracies are computed with it
    last = doc["rounds"][-1]
    assert all(math.isfinite(last[key]) for key in ("local-acc", "neighbour-acc")), last
    # Round 1's only accepted reply had norm ~1e6 * C: the server's re-clip bounds the
    # update by C plus the noise (whose norm is ~sqrt(d) std; 2x leaves a wide margin)
    first = doc["rounds"][0]
    dim = 16 * 128
    assert first["update-norm"] <= clip_norm + 2 * math.sqrt(dim) * first["noise-std"], first


# --- issue 28: a cheating server and a poisoned secure input ------------------------------
def test_key_substituting_server_and_poisoned_secure_input_are_refused(
    federation: Federation, tmp_path: Path
) -> None:
    # Prepare: a copy of the project whose ServerApp substitutes every node's neighbours'
    # keys in round 1 (tests/hostile_app/cheating_server.py) and whose node 0 sends a
    # masked input of 30 C in round 2 (hostile_client.py, mode secure-poison); the nodes
    # sign their rounds with their node-auth keys (deploy_processes.start_supernode)
    app = hostile_app_copy(tmp_path / "cheating-app", cheating_server=True)
    ids = {node.partition_id: node.node_id for node in federation.nodes}

    # Execute
    run_id = federation.submit(
        app,
        overrides(
            federation, "cheat", num_server_rounds=2, aggregation="'secure'", evaluate_every=2,
        ),
    )  # fmt: skip
    info = federation.wait_finished(run_id, 2 * RUN_TIMEOUT_S)  # 5 stages, then evaluate
    log = federation.server_log(run_id)

    # Assert: round 1 - the server did substitute the keys, and every client refused
    # them, naming the signature failure, before sharing anything: no input was trained,
    # masked or revealed
    assert info["status"] == "finished:completed", info
    assert log.count("cheating server: substituted the keys") == NUM_NODES
    for node_id in ids.values():
        refusal = (
            rf"secure round 1: node {node_id} dropped out at {Stage.SHARE_KEYS}: .*"
            rf"node {node_id}: neighbour \d+'s key advertisement has an invalid signature"
            r".*signature check failed"
        )
        assert re.search(refusal, log), refusal
    assert f"secure round 1 discarded at stage {Stage.SHARE_KEYS}" in log
    assert f"{Stage.COLLECT_MASKED}" not in log.split("secure round 2")[0]
    # round 2 - an honest server, node 0's poisoned input: the sum is refused and logged
    assert re.search(
        rf"secure round 2 discarded at stage {Stage.UNMASK}: unmasked sum out of bound"
        r".*poisoned",
        log,
    )
    rows = results(federation, "cheat")["rounds"]
    assert [row["survivors"] for row in rows] == [0, 0], rows
    assert [row["secagg-aborted-stage"] for row in rows] == [
        ABORT_CODES[Stage.SHARE_KEYS],
        ABORT_CODES[Stage.UNMASK],
    ], rows
