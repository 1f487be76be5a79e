"""The three-organisation federation the deployment tests share (docs/deployment.md).

One SuperLink with TLS, SuperNode authentication and a ``--database``; three SuperNodes,
each with its own key (from ``scripts/make-certs.sh``), Flower home and state directory;
``flwr run . orgs`` through a named connection. Each deployment test module starts one
(~20 s) for its tests and tears it down by PID at the end; two modules let two test
processes run them side by side.

The SuperNodes carry a ``hostile-modes`` node-config key that only the test-only
hostile ClientApp reads (``tests/hostile_app``); the real app ignores it, so the honest
runs are the real thing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy_processes import Federation, Node, wait_until

NUM_NODES = 3
# Round r uses the r-th mode (tests/hostile_app/hostile_client.py); the real app ignores it.
HOSTILE_MODES = ("huge-norm,secure-poison", "wrong-shape,extra-keys", "non-finite,error")
RUN_TIMEOUT_S = 480
# A killed SuperNode is noticed through missed heartbeats (Flower 1.41: 37-60 s).
HEARTBEAT_GRACE_S = 120


@contextmanager
def three_organisations(root: Path, workers: tuple[int, ...]) -> Iterator[Federation]:
    """SuperLink + 3 registered, connected SuperNodes; an extra key that is never registered.

    The nodes in ``workers`` run as ``docs/deployment.md`` recommends: ``dpfpl-superexec``
    forks each message's ClientApp from a warm process, which hands the message to the
    node worker. The others keep Flower's own ``flower-superexec`` and a process per
    message that imports torch and loads the model (rounds about three times longer).
    """
    fed = Federation(root, NUM_NODES)
    for index in workers:
        fed.nodes[index].worker = fed.nodes[index].forked = True
    try:
        fed.make_credentials(extra_keys=["intruder"])
        fed.start_superlink()
        for node, modes in zip(fed.nodes, HOSTILE_MODES, strict=True):
            fed.register(node)
            fed.start_supernode(node, extra=f"hostile-modes='{modes}'")
        fed.wait_activated(fed.nodes, 90)
        yield fed
    finally:
        fed.close()


def overrides(fed: Federation, name: str, **values: Any) -> str:
    """``--run-config`` of a run named ``name`` on all three nodes, with ``values`` on top."""
    pairs = {
        "output-dir": f"'{fed.runs}'",
        "run-name": f"'{name}'",
        "min-nodes": NUM_NODES,
        "node-wait-timeout": 60,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        **{key.replace("_", "-"): value for key, value in values.items()},
    }
    return " ".join(f"{key}={value}" for key, value in pairs.items())


def results(fed: Federation, name: str) -> dict[str, Any]:
    return json.loads((fed.runs / name / "results.json").read_text())


def state_file(node: Node, run_name: str, name: str) -> Path:
    return node.state_dir / run_name / f"partition-{node.partition_id}" / name


def crash_and_restart(federation: Federation, node: Node) -> None:
    """SIGKILL a SuperNode; start it again (same key, node config, state directory).

    The restart waits until the SuperLink has noticed: before that, Flower refuses to
    activate a node it still thinks is online.
    """
    federation.kill_supernode(node)
    wait_until(
        lambda: node.node_id not in federation.online_node_ids(),
        HEARTBEAT_GRACE_S,
        "the SuperLink to mark the killed node offline",
        every=10,  # nothing but the CLI tells, and it is slow to ask; Flower takes 37-60 s
    )
    modes = HOSTILE_MODES[federation.nodes.index(node)]
    federation.start_supernode(node, extra=f"hostile-modes='{modes}'")
