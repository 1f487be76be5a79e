"""Where a message's time goes on a node: one log line per message.

In a deployment a message's cost is mostly not its compute: Flower starts a process,
which imports torch and transformers and loads the frozen model. The line makes that
visible to an operator in the SuperNode's log (and to ``benchmarks/bench_rounds.py``,
which reads it there), with and without the node worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

# A process's age is a message's start-up cost only for the first message it handles:
# a simulation's actors and the node worker serve many, and their later messages paid
# nothing for it.
_first_message = True
_LINE = re.compile(r"message timing \(([^)]*)\): (.*)$")


def serving_many_messages() -> None:
    """Mark this process as long-lived (the node worker): its age is not a message's cost."""
    global _first_message
    _first_message = False


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


class MessageTimes:
    """The parts of one message's handling, in seconds, in the order they ran."""

    def __init__(self) -> None:
        age = process_age() if _first_message else None
        serving_many_messages()
        self.parts: dict[str, float] = {} if age is None else {"process start and imports": age}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = time.perf_counter() - started

    def line(self, kind: str) -> str:
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.parts.items())
        return f"message timing ({kind}): {parts}"


def read_line(text: str) -> tuple[str, dict[str, float]] | None:
    """The message kind and its parts in seconds, from a log line that holds a ``line``.

    The benchmarks read these from SuperNode and simulation logs, whatever prefix the
    logger put before the line; None for any other line.
    """
    match = _LINE.search(text)
    if match is None:
        return None
    parts = {}
    for part in match[2].split(", "):
        name, value, _unit = part.rsplit(" ", 2)
        parts[name] = float(value)
    return match[1], parts
