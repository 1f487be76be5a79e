"""The bounded wait for SuperNodes: its messages name the settings a user can change."""

from __future__ import annotations

import logging

import pytest
from flwr.clientapp import ClientApp

from dpfpl_app.federation import node_wait
from tests.flower_harness import InProcessGrid

_idle_app = ClientApp()


def test_the_timeout_error_names_num_supernodes_and_the_run_config_keys() -> None:
    grid = InProcessGrid(client_app=_idle_app, num_nodes=2, run_config={})

    with pytest.raises(RuntimeError) as raised:
        node_wait.wait_for_nodes(grid, 10, 0.05, "train")

    message = str(raised.value)
    assert "only 2 node(s) connected" in message
    assert 'num-supernodes=10' in message
    assert "min-nodes=10" in message and "node-wait-timeout" in message
    assert "min_nodes" not in message and "node_wait_timeout" not in message


def test_the_waiting_line_names_num_supernodes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(node_wait, "NODE_POLL_INTERVAL", 0.01)
    grid = InProcessGrid(client_app=_idle_app, num_nodes=1, run_config={})
    caplog.set_level(logging.INFO, logger="flwr")

    with pytest.raises(RuntimeError):
        node_wait.wait_for_nodes(grid, 3, 0.05, "evaluate")

    waiting = [r.getMessage() for r in caplog.records if "waiting for nodes" in r.getMessage()]
    assert waiting, caplog.text
    assert "min-nodes=3" in waiting[0] and "num-supernodes=3" in waiting[0]


def test_enough_nodes_are_returned_at_once() -> None:
    grid = InProcessGrid(client_app=_idle_app, num_nodes=3, run_config={})

    assert node_wait.wait_for_nodes(grid, 3, 0.05, "train") == sorted(grid.get_node_ids())
