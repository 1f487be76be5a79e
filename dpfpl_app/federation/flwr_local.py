"""Run this app with ``flwr run`` on a private local SuperLink, from Python, and wait for it.

The sweep runner submits many runs; each must be a real Flower simulation, exactly what
a user gets from ``flwr run .``. Three Flower behaviours shape this module: ``flwr run``
returns once the run is submitted (``--stream`` even exits 0 when the ServerApp
crashed), so completion is read from the run's JSON status; the local SuperLink it
starts keeps running in the background, so it is ended by PID; it listens on fixed
default ports, so each ``LocalFlower`` gets its own ``FLWR_HOME`` and free ports; and
``flwr`` gives that SuperLink a fixed 15 s to come up, which a loaded 2-core machine can
exceed, so its start is retried here with our own patience, on fresh ports each time.
That SuperLink keeps its state in memory, never in a file: Flower creates its SQLite
schema in steps that are not atomic, and a start killed halfway (by ``flwr``'s 15 s, or
by us) leaves a ``state.db`` on which every later start exits with code 1. Ray, under the
simulation, gives its raylet a fixed 30 s to register; a run that failed only because
it did not is submitted once more (no client had run, so no data was read or released).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLWR = str(Path(sys.executable).with_name("flwr"))
LOG_POLL_S = 1.0
"""How often a run's wait reads the SuperLink's log (a few milliseconds)."""
FALLBACK_S = 30.0
"""How often the run's status is asked for when the log never says it ended. Each ask is a
``flwr`` process (~2 CPU-seconds, ~10 s on a loaded 2-core machine): asking every few
seconds took a core's share from the run it waited for."""
IN_MEMORY_CONNECTION = """[superlink]
default = "local"

[superlink.local]
address = ":local-in-memory:"
"""
"""This home's ``config.toml``: ``flwr`` starts the local SuperLink without a database."""
STARTUP_S = 300.0
"""How long to keep asking for the local SuperLink to come up before giving up."""
RAY_START_FAILURE = "The current node timed out during startup"
"""What Ray raises when its raylet has not registered within its hard-coded 30 s (seen
in CI beside a deployment test at load average 10 and more); no ClientApp has run."""

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    """One run-config value in the inline TOML ``--run-config`` takes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is JSON-compatible


class LocalFlower:
    """A private ``FLWR_HOME`` whose local SuperLink simulates the runs it is given."""

    def __init__(self, app_dir: Path, flwr_home: Path, *, threads: int | None = None) -> None:
        """``threads``: CPU threads of each process of the runs (torch's intra-op pool).

        Unset, torch takes every core. Two runs side by side then put twice as many
        spinning threads as cores on the machine, and a train message of the tiny
        backbone took 1.5-4 s instead of 0.07 s; one thread per run avoids that.
        """
        # absolute: `flwr` runs with cwd=app_dir, so a relative path would resolve twice
        self.app_dir = Path(app_dir).resolve()
        self.flwr_home = Path(flwr_home).resolve()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            # offline machines: never build a runtime environment per run
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        self._pick_ports()
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            # inherited by the SuperLink this FLWR_HOME starts, its simulation and actors
            self.env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def __enter__(self) -> LocalFlower:
        return self  # the home is made by the first start, the one thing that needs it

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(
        self, run_config: dict[str, Any], *, num_supernodes: int, timeout_s: float
    ) -> tuple[int, str]:
        """Submit one run, wait until it finishes; returns (run id, final status).

        A run that failed because Ray did not start in time is submitted once more
        (each attempt has ``timeout_s``); any other failure is returned as it is.
        """
        run_id, status = self._run_once(run_config, num_supernodes, timeout_s)
        if status == "finished:failed" and RAY_START_FAILURE in self.log(run_id):
            logger.warning(
                "run %d failed before any client ran: Ray's raylet did not register within "
                "Ray's 30 s (a busy machine); submitting the run once more", run_id)
            run_id, status = self._run_once(run_config, num_supernodes, timeout_s)
        return run_id, status

    def _run_once(
        self, run_config: dict[str, Any], num_supernodes: int, timeout_s: float
    ) -> tuple[int, str]:
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        self.start_superlink()
        submitted = self._json(
            [
                "run",
                str(self.app_dir),
                "--run-config",
                overrides,
                "--federation-config",
                f"num-supernodes={num_supernodes}",
            ]
        )
        if submitted.get("success") is not True:
            raise RuntimeError(f"flwr run refused the run: {submitted}")
        run_id = int(submitted["run-id"])
        ended = re.compile(rf"Finished task \d+ of run {run_id}\b")
        asked = time.monotonic()
        deadline, status = asked + timeout_s, "pending"
        while not status.startswith("finished"):
            if time.monotonic() > deadline:
                self._json(["stop", str(run_id)])
                return run_id, f"timeout after {timeout_s:.0f} s ({status})"
            time.sleep(LOG_POLL_S)
            # The SuperLink logs the end of the run's ServerApp task; the status (which
            # alone decides) is asked for then, and every FALLBACK_S in case it never says
            if not ended.search(self.superlink_log()) and time.monotonic() - asked < FALLBACK_S:
                continue
            asked = time.monotonic()
            try:
                listed = self._json(["list", "--run-id", str(run_id)])
            except (RuntimeError, subprocess.TimeoutExpired):
                continue  # one CLI call failing on a loaded machine is "not yet", not an end
            if listed.get("success") and listed.get("runs"):
                status = str(listed["runs"][0]["status"])
        return run_id, status

    def superlink_log(self) -> str:
        """What this home's local SuperLink has logged so far ("" before it starts)."""
        path = self.flwr_home / "local-superlink" / "superlink.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def start_superlink(self) -> None:
        """Make sure this home's SuperLink is up before a run is submitted to it.

        ``flwr`` starts it on first use and kills it if it is not answering within 15 s
        (a constant of Flower's), which a loaded 2-core machine can exceed (measured: 17 s
        beside 14 busy loops). Listing the (empty) runs starts it the same way, and a
        failed start is asked for again on new ports: a port found free when it was
        picked can be bound by another process before the SuperLink binds it (Ray binds
        dozens), and then every start on it fails. CI lost sweep cells to starts that
        all exited with code 1 over 5 min, on one port and then on fresh ones; the cause
        was a ``state.db`` half-created by a killed start, hence the in-memory state.
        """
        if self.superlink_pids():
            return
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(IN_MEMORY_CONNECTION)
        deadline, attempts = time.monotonic() + STARTUP_S, 0
        while True:
            attempts += 1
            try:
                answer = self._json(["list"])
                if answer.get("success") is True:
                    return
                why = str(answer)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                why = str(err)
            if time.monotonic() > deadline:
                log = self.flwr_home / "local-superlink" / "superlink.log"
                tail = self.superlink_log().splitlines()[-5:]
                raise RuntimeError(
                    f"the local SuperLink of {self.flwr_home} did not start in "
                    f"{attempts} attempts over {STARTUP_S:.0f} s (last: {why}); see "
                    f"{log}, which ends:\n" + "\n".join(tail)
                )
            self.stop()  # one still coming up would hold the old ports and this home
            self._pick_ports()
            time.sleep(5)

    def _pick_ports(self) -> None:
        """Free ports for the SuperLink's HTTP API and the ``flwr`` calls that find it."""
        self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
        self.env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())

    def log(self, run_id: int) -> str:
        """The run's log as ``flwr log --show`` prints it (ServerApp and simulation output)."""
        return self._flwr(["log", str(run_id), "--show"]).stdout

    def stop(self) -> None:
        """End the background SuperLink of this FLWR_HOME (its simulation processes follow)."""
        deadline = time.monotonic() + 30
        while (pids := self.superlink_pids()) and time.monotonic() < deadline:
            sig = signal.SIGTERM if time.monotonic() < deadline - 15 else signal.SIGKILL
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(1)
        if self.superlink_pids():
            raise RuntimeError(f"the local SuperLink of {self.flwr_home} survived SIGKILL")

    def superlink_pids(self) -> list[int]:
        """The SuperLink processes whose files are under this FLWR_HOME, and no other's.

        Matched on a whole path component: ``.flwr`` must not also end the SuperLink of
        ``.flwr-1`` beside it (a sweep's side-by-side cells lost a run to that).
        """
        listing = subprocess.run(
            ["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=False
        ).stdout
        inside = str(self.flwr_home) + os.sep
        pids = []
        for line in listing.splitlines():
            pid, _, args = line.strip().partition(" ")
            if "flower-superlink" in args and any(a.startswith(inside) for a in args.split()):
                pids.append(int(pid))
        return pids

    def _flwr(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        """One ``flwr`` CLI call against this FLWR_HOME, from the app directory."""
        return subprocess.run(
            [FLWR, *args],
            cwd=self.app_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def _json(self, args: list[str]) -> dict[str, Any]:
        out = self._flwr([*args, "--format", "json"])
        start = out.stdout.find("{")
        if start < 0:
            raise RuntimeError(f"flwr {args[0]} printed no JSON:\n{out.stdout}\n{out.stderr}")
        return dict(json.loads(out.stdout[start:]))
