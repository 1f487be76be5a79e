"""The tests' CPU priority: real-process tests ahead of the computing tests beside them.

Flower 1.42 restarts a ClientApp or ServerApp process that has not reported back within
30 s of being claimed, and Ray gives its raylet 30 s to register (both hard-coded). On a
saturated 2-core machine the restarted process is as slow, so a deployment test's round
loops until it times out (``docs/flower-limits.md``, limit 8), and a simulation fails
with "The current node timed out during startup". So a test marked ``slow`` (it drives
real Flower or Ray processes) runs, and starts its processes, at the session's own
niceness, and every other test runs ``TEST_NICENESS`` nicer: the computing tests wait,
not the processes with deadlines.

CI lost two simulation tests to Ray's deadline when only the deployment tests' processes
had the session's priority and the simulation tests' Ray was niced with the rest.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TEST_NICENESS = 5
"""How much nicer than the session a test that drives no real processes runs."""

BASE_NICENESS_ENV = "DPFPL_TEST_BASE_NICENESS"
"""Where the first pytest process records the session's niceness for its workers."""


def session_niceness() -> int:
    """The niceness pytest was started at (recorded once; workers inherit the record)."""
    return int(os.environ.setdefault(BASE_NICENESS_ENV, str(os.getpriority(os.PRIO_PROCESS, 0))))


def niceness_for(real_processes: bool) -> int:
    """The niceness a test runs at: the session's for real processes, else nicer."""
    return session_niceness() + (0 if real_processes else TEST_NICENESS)


def set_niceness(value: int) -> None:
    """Give every thread of this process ``value``, where allowed.

    Linux keeps a niceness per thread, and a thread or child process inherits its
    creator's: torch's pool threads made during a niced test would stay niced otherwise.
    Lowering a niceness needs root (as in CI); without it a thread keeps its niceness.
    """
    tasks = Path("/proc/self/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    for tid in tids:
        # not allowed, or a thread that ended while we walked the list
        with contextlib.suppress(PermissionError, ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, tid, value)


def thread_niceness() -> list[int]:
    """The niceness of each thread of this process (of the process, without ``/proc``)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return [os.getpriority(os.PRIO_PROCESS, 0)]
    out = []
    for task in tasks.iterdir():
        with contextlib.suppress(ProcessLookupError):
            out.append(os.getpriority(os.PRIO_PROCESS, int(task.name)))
    return out
