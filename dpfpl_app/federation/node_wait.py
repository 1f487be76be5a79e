"""Waiting for enough SuperNodes before a round, bounded, with a message that says what to set.

Flower's own sampling waits forever while fewer than the wanted nodes are online; ours
gives up after ``node-wait-timeout`` seconds. The usual cause is not the network but a
simulation started with fewer SuperNodes than ``min-nodes`` (Flower's default federation
has 2), so the messages name the federation setting ``num-supernodes`` and the run-config
keys a user can change, not Python argument names.
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.common.logger import log
from flwr.serverapp import Grid

NODE_POLL_INTERVAL = 1.0
"""Seconds between two looks at the connected nodes."""


def waiting_message(purpose: str, connected: int, min_nodes: int, remaining: float) -> str:
    """The progress line logged while the server waits."""
    return (
        f"{purpose}: waiting for nodes: {connected} connected, min-nodes={min_nodes} needed "
        f"({remaining:.0f} s left of node-wait-timeout; in simulation start them with "
        f'--federation-config "num-supernodes={min_nodes}")'
    )


def too_few_nodes_message(purpose: str, connected: int, min_nodes: int, waited: float) -> str:
    """The error when the wait ends: the settings that fix it, simulation first."""
    return (
        f"{purpose}: only {connected} node(s) connected after waiting {waited:g} s, but "
        f"min-nodes={min_nodes} are needed. In simulation, start that many SuperNodes: "
        f'flwr run . --federation-config "num-supernodes={min_nodes}" (Flower\'s default '
        f'federation has 2), or lower the run-config key: --run-config "min-nodes={connected}". '
        "In a deployment, check that the SuperNodes are running and reach the SuperLink "
        "(address, TLS root certificates, SuperNode auth registration). "
        "Raise node-wait-timeout to wait longer."
    )


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float, purpose: str) -> list[int]:
    """The connected node ids (sorted) once at least ``min_nodes`` are online.

    Raises
    ------
    RuntimeError
        If fewer than ``min_nodes`` are connected after ``timeout`` seconds.

    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(too_few_nodes_message(purpose, len(nodes), min_nodes, timeout))
        log(INFO, "%s", waiting_message(purpose, len(nodes), min_nodes, remaining))
        time.sleep(min(NODE_POLL_INTERVAL, remaining))
    return nodes
