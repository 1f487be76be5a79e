"""``send_and_receive`` through Flower's public ``push_messages`` / ``pull_messages``.

Two of Flower 1.42's grids wait in ways that cost a round more than its clients do:

* a deployment's ``HttpGrid`` pushes every message, then sleeps a fixed 3 s between
  checks for replies, so each exchange is rounded up to the next multiple of 3 s after
  its last reply (a secure round has five exchanges);
* a simulation's ``InMemoryGrid`` pushes every message at once, and the simulation
  engine asks each node for a message every 0.1 s, each ask scanning every stored
  message: nodes x messages in flight per sweep, a whole core at 1000 sampled clients
  (``docs/simulation-scale.md``).

``PollingGrid`` does the same exchange with a short pull interval and, optionally, at
most ``window`` messages in flight: the next is pushed as soon as a reply frees a
slot. A deployment gets no window (its SuperNodes are other machines working in
parallel; holding messages back would serialise them), a simulation gets one a few
times the number of its actors, which keeps them fed while the engine's scans stay small.

Replies come back in the order they arrive, as from Flower's grids; error replies
(a ClientApp that raised, a node Flower gave up on) are passed through as the wrapped
grid returns them. ``timeout`` bounds the whole exchange: what has no reply by then
has none, and messages still held back by the window are never sent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from itertools import islice
from logging import INFO
from typing import Any, Literal

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid

PULL_INTERVAL = 0.2
"""Deployment: seconds between checks for replies, one cheap request to the SuperLink each."""

WINDOW_PULL_INTERVAL = 0.005
"""Simulation: seconds between checks; a check of a few messages is a dict lookup each."""

MessageWindow = int | Literal["auto", "off"]


class PollingGrid(Grid):
    """``grid`` whose ``send_and_receive`` pulls every ``interval`` s, ``window`` in flight.

    ``window=None`` pushes every message at once.
    """

    def __init__(
        self, grid: Grid, interval: float = PULL_INTERVAL, window: int | None = None
    ) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 message (or None), got {window}")
        self._grid = grid
        self._interval = interval
        self.window = window

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = iter(messages)
        in_flight: set[str] = set()
        replies: list[Message] = []
        more = True  # the iterator may still hold messages
        while True:
            room = None if self.window is None else self.window - len(in_flight)
            if more and (room is None or room > 0):
                batch = list(islice(waiting, room))
                more = room is not None and len(batch) == room
                if batch:  # a grid may refuse a message (unknown node): it returns no id
                    in_flight.update(self._grid.push_messages(batch))
            if not in_flight:
                if more:
                    continue  # every message of that batch was refused: push the next
                return replies
            arrived = list(self._grid.pull_messages(in_flight))
            replies.extend(arrived)
            in_flight.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if (not in_flight and not more) or (
                deadline is not None and time.monotonic() >= deadline
            ):
                return replies
            if not (arrived and more):  # else a slot just freed: fill it at once
                time.sleep(self._interval)

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


def window_size(setting: MessageWindow) -> int | None:
    """Messages in flight for a ``message-window`` setting; None = all at once.

    ``auto`` is twice this machine's CPU cores: Ray gives each actor at least one CPU
    (Flower's default client resources ask for two), so that is at least twice the
    actors, enough to queue the next message for each while they compute.
    """
    if setting == "off":
        return None
    if setting == "auto":
        return 2 * (os.cpu_count() or 1)
    return int(setting)


def responsive(grid: Grid, window: MessageWindow = "auto") -> Grid:
    """The grid a run sends through.

    A deployment's ``HttpGrid`` is polled every ``PULL_INTERVAL`` with every message
    pushed at once; any other grid (Flower's simulation, the tests' in-process grid) is
    windowed as ``window`` says, or used as it is with ``window="off"``.
    """
    if isinstance(grid, HttpGrid):
        return PollingGrid(grid)
    size = window_size(window)
    if size is None:
        return grid
    log(INFO, "simulation: at most %d messages in flight (message-window %s)", size, window)
    return PollingGrid(grid, WINDOW_PULL_INTERVAL, window=size)
