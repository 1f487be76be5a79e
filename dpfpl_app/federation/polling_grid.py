"""A deployment Grid that collects replies as they arrive, not on a 3-second beat.

Flower 1.42's ``HttpGrid.send_and_receive`` pushes the messages, then checks for replies
and sleeps a fixed 3 s between checks: every message exchange of a round is rounded up
to the next multiple of 3 s after its last reply (a secure round has five). This wrapper
does the same with Flower's public ``push_messages`` / ``pull_messages`` and a short
interval. Simulation grids poll quickly already and are used as they are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid

PULL_INTERVAL = 0.2
"""Seconds between checks for replies: one cheap request to the SuperLink each."""


class PollingGrid(Grid):
    """``grid`` with a ``send_and_receive`` that checks for replies every ``interval`` s."""

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL) -> None:
        self._grid = grid
        self._interval = interval

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._interval)
        return replies

    # --- everything else is the wrapped grid's -------------------------------------------
    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:  # e.g. get_nodes, when a Grid offers it
        return getattr(self._grid, name)


def responsive(grid: Grid) -> Grid:
    """A deployment's ``HttpGrid`` wrapped in ``PollingGrid``; any other grid as it is."""
    return PollingGrid(grid) if isinstance(grid, HttpGrid) else grid
