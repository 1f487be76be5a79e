"""Nodes that crash mid-run, across organisations: a SuperNode, a node worker, a node
lost between secure-aggregation stages; and SecFPP against real SuperNodes.

Its own federation (``deploy_federation.py``), so that a second test process runs these
beside ``test_deployment.py``: most of both is waiting on Flower's heartbeats.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_federation import (
    NUM_NODES,
    RUN_TIMEOUT_S,
    crash_and_restart,
    overrides,
    results,
    state_file,
    three_organisations,
)
from deploy_processes import Federation, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, digits_backbone: Path
) -> Iterator[Federation]:
    # every node answers through a worker: the process-per-message path and a mixed
    # federation are test_deployment.py's; here each round is about three times shorter
    with three_organisations(tmp_path_factory.mktemp("deploy"), workers=(0, 1, 2)) as fed:
        yield fed


# --- issue 5: faults, part 2 (a SuperNode crashes and comes back) ------------------------
def test_supernode_killed_mid_run_rejoins_and_resumes_its_local_prompt(
    federation: Federation,
) -> None:
    # Prepare: 3 plain rounds, each one exchange (fold-evaluation: a round's evaluation
    # rides on the next round's train message); partition 2 will crash after its round 1,
    # losing its round-2 training and its round-1 evaluation. Every round waits
    # for all three nodes to be online (min-nodes 3, a wait longer than a restart), so the
    # round that starts after the restart has the victim back whatever the machine's load;
    # the round its crash cut short runs on the two replies that came.
    victim, others = federation.nodes[2], federation.nodes[:2]
    run_id = federation.submit(
        federation.app,
        overrides(
            federation, "fault", num_server_rounds=3, aggregation="'plain'",
            node_wait_timeout=RUN_TIMEOUT_S, fold_evaluation="true",
        ),
    )  # fmt: skip
    saved = state_file(victim, "fault", "meta.json")
    wait_until(saved.exists, RUN_TIMEOUT_S, "the victim's round-1 state on its disk", every=1)

    # Execute: crash it; restart it (same key and state directory)
    crash_and_restart(federation, victim)
    info = federation.wait_finished(run_id, 2 * RUN_TIMEOUT_S)
    log = federation.server_log(run_id)

    # Assert: the run completed; the lost reply was refused and logged with the node
    assert info["status"] == "finished:completed", info
    refusal = f"(train|evaluate) round [12]: refused reply from node {victim.node_id}: error reply"
    assert re.search(refusal, log), "the lost reply must be logged with the node that died"
    rows = results(federation, "fault")["rounds"]
    assert [row["round"] for row in rows] == [1, 2, 3]
    short = [r for r in rows[:2] if r["accepted"] < NUM_NODES or r["eval-accepted"] < NUM_NODES]
    assert short, f"no round ran without the killed node: {rows}"
    assert all(math.isfinite(r["epsilon"]) for r in rows)
    # ... the node rejoined (for round 3 at the latest) and continued its own local prompt
    # from disk: it counts its pre-crash round 1 plus every later round it took part in;
    # a fresh start would have counted one round less.
    assert rows[2]["accepted"] == NUM_NODES, rows[2]
    rejoined = sum(1 for row in rows[1:] if row["accepted"] == NUM_NODES)
    meta = json.loads(saved.read_text())
    assert meta["rounds_done"] == 1 + rejoined, (meta, rows)
    assert meta["steps_taken"] == 1 + rejoined, meta
    for node in others:
        assert json.loads(state_file(node, "fault", "meta.json").read_text())["rounds_done"] == 3


def test_node_worker_killed_mid_run_is_replaced_and_loses_nothing(
    federation: Federation,
) -> None:
    # Prepare: 3 plain rounds, each one exchange (fold-evaluation: rounds 1 and 2 are
    # evaluated inside the next round's train messages); node 1 answers through its worker
    node = federation.nodes[1]
    run_id = federation.submit(
        federation.app,
        overrides(federation, "worker-kill", num_server_rounds=3, aggregation="'plain'",
                  fold_evaluation="true"),
    )
    saved = state_file(node, "worker-kill", "meta.json")
    wait_until(saved.exists, RUN_TIMEOUT_S, "node 1's round-1 state on its disk", every=0.5)
    killed = node.worker_pid
    assert killed is not None

    # Execute: a crash of the worker alone (the SuperNode stays up)
    os.kill(killed, signal.SIGKILL)
    info = federation.wait_finished(run_id, RUN_TIMEOUT_S)

    # Assert: the run completed; the next message started a new worker, and the node's
    # local prompt went on from its state: it counts every round whose train reply the
    # server accepted from it, plus at most the one whose reply the kill cut off after
    # the state was saved (the state is saved before replying, so none is ever lost)
    assert info["status"] == "finished:completed", info
    assert node.worker_pid not in (None, killed)
    doc = results(federation, "worker-kill")
    rows = doc["rounds"]
    assert doc["config"]["fold-evaluation"] is True
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert all(row["eval-accepted"] >= 1 for row in rows), rows  # every round evaluated
    log = federation.server_log(run_id)
    assert len(re.findall(r"evaluate round \d+: sampled", log)) == 1, "one evaluate exchange"
    complete = sum(1 for row in rows if row["accepted"] == NUM_NODES)
    assert complete >= 2, rows
    rounds_done = json.loads(saved.read_text())["rounds_done"]
    assert complete <= rounds_done <= complete + 1, (rounds_done, rows)


# --- issue 12: secure aggregation across organisations, with a node lost mid-round -------
def test_secure_round_survives_a_supernode_killed_between_stages(federation: Federation) -> None:
    # Prepare: the default 'auto' is secure here; 2 rounds so the victim can rejoin, one
    # secure evaluation (after round 2: a round-1 evaluation, which needs every node,
    # would only wait for the victim's restart)
    victim = federation.nodes[1]
    run_id = federation.submit(
        federation.app,
        overrides(federation, "secure-drop", num_server_rounds=2, evaluate_every=2),
    )
    # Its SuperNode logs each message it receives: the masked stage comes only after every
    # node's key shares were answered, and its ClientApp process takes seconds to start.
    masked_stage = "Receiving: train.secagg_collect_masked message"
    wait_until(
        lambda: masked_stage in victim.log.read_text(),
        RUN_TIMEOUT_S,
        "the victim to be asked for its masked input (then the kill)",
        every=0.5,
    )

    # Execute: crash the victim after it shared its mask secrets, before it sends its
    # masked input; restart it, so round 2 has all three again
    crash_and_restart(federation, victim)
    info = federation.wait_finished(run_id, 2 * RUN_TIMEOUT_S)
    log = federation.server_log(run_id)

    # Assert: round 1 released the sum of the two masked inputs that arrived: the victim
    # dropped out at the masked stage, and the survivors' unmask answers (its key shares)
    # removed the pairwise masks it shared with them
    assert info["status"] == "finished:completed", info
    dropped = f"secure round 1: node {victim.node_id} dropped out at secagg_collect_masked"
    assert dropped in log, log
    unmask = re.search(r"secure round 1: secagg_unmask answered by (\d+) of (\d+)", log)
    assert unmask, "round 1 never reached the unmask stage"
    answered, asked = int(unmask[1]), int(unmask[2])
    assert answered == asked == NUM_NODES - 1, log
    first, second = results(federation, "secure-drop")["rounds"]
    assert first["survivors"] == asked and first["secagg-aborted-stage"] == 0, first
    assert math.isfinite(first["update-norm"]) and math.isfinite(first["epsilon"]), first
    # ... and the federation carried on with all three nodes in round 2
    assert second["survivors"] == NUM_NODES, second


# --- issue 13: SecFPP across organisations ------------------------------------------------
def test_secfpp_clusters_and_trains_against_real_supernodes(federation: Federation) -> None:
    """SecFPP's secure clustering and per-cluster round over TLS, node auth, 3 SuperNodes.

    Three nodes with min-cluster-size 3 can only form one cluster; the k = 2 candidates
    still run and are closed, which is the rule this exercises across processes.
    """
    run_id = federation.submit(
        federation.app,
        overrides(
            federation, "secfpp", method="'secfpp'", num_server_rounds=1, max_clusters=2,
            cluster_iterations=1, cluster_restarts=1, summary_dim=8,
        ),
    )
    info = federation.wait_finished(run_id, 2 * RUN_TIMEOUT_S)
    log = federation.server_log(run_id)

    assert info["status"] == "finished:completed", info
    doc = results(federation, "secfpp")
    assert doc["config"]["aggregation"] == "secure"
    clusters = doc["summary"]["clusters"]
    assert clusters["counts"] == [NUM_NODES] and clusters["secure_sums"] == 4, clusters
    assert "secure clustering: k=1 chosen" in log
    (round1,) = doc["rounds"]
    assert round1["survivors"] == NUM_NODES and round1["clusters"] == 1
    assert math.isfinite(round1["epsilon"]) and math.isfinite(round1["local-acc"])
