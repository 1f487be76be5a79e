"""Real Flower deployment processes on loopback, for the deployment tests.

One :class:`Federation` is what an operator and three organisations would run: a
SuperLink with TLS, SuperNode authentication and a ``--database``, SuperNodes with their
own keys, Flower homes and state directories, and the ``flwr`` CLI talking to the
SuperLink through a named connection in ``$FLWR_HOME/config.toml``. Credentials come from
``scripts/make-certs.sh``, the script users run.

Discipline (as ``tests/test_flwr_run.py``): a throwaway root per federation, free ports,
``timeout`` on every CLI call, run status from ``flwr list --run-id ID --format json``
only, and every process ended by PID: the whole tree we started (Flower's own SuperExec,
ServerApp and ClientApp children included), then any straggler still naming one of our
ports or our root in its command line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_CERTS = REPO / "scripts" / "make-certs.sh"
CONNECTION = "orgs"
CLI_TIMEOUT_S = 90
# How often ``wait_cli`` asks the CLI when no log line hints at the answer.
CLI_FALLBACK_S = 15.0
FINISHED = "finished:"
# What docs/deployment.md recommends to operators: the SuperNode's SuperExec looks for a
# pending message every 0.2 s instead of every 1 s, and sends Flower no usage events.
SUPERNODE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", "FLWR_TELEMETRY_ENABLED": "0"}

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T | None], timeout: float, what: str, every: float = 2.0) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def wait_cli(
    hint: Callable[[], bool],
    ask: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    every: float = 1.0,
    fallback: float = CLI_FALLBACK_S,
) -> T:
    """Wait for ``ask`` (a ``flwr`` CLI call), asked only when ``hint`` says it may be true.

    Each CLI call is a Python process of ~2.5 CPU-seconds, so polling it every few
    seconds took a core from the tests beside. ``hint`` reads a log file (a few ms);
    ``ask`` still decides, and is also asked every ``fallback`` seconds in case the
    file never says (a SuperLink killed mid-run logs nothing).
    """
    last = -math.inf

    def check() -> T | None:
        nonlocal last
        if not hint() and time.monotonic() - last < fallback:
            return None
        last = time.monotonic()
        return ask()

    return wait_until(check, timeout, what, every=every)


# --- processes, by PID --------------------------------------------------------------
def _ps() -> list[tuple[int, int, str]]:
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True
    ).stdout
    rows = []
    for line in out.splitlines():
        pid, ppid, *args = line.split(None, 2)
        rows.append((int(pid), int(ppid), args[0] if args else ""))
    return rows


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (Flower starts SuperExecs and app processes)."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in _ps():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pids_naming(tokens: list[str]) -> list[int]:
    """PIDs whose command line contains any token (our ports and root are unique)."""
    me = os.getpid()
    return [pid for pid, _, args in _ps() if pid != me and any(token in args for token in tokens)]


def end_pids(pids: list[int], *, first: signal.Signals = signal.SIGTERM, grace: float = 15) -> None:
    """Send ``first`` to each PID, then SIGKILL whatever is still alive after ``grace`` s."""
    for sig in (first, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig != signal.SIGKILL else 5)
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.5)
        if not any(_alive(pid) for pid in pids):
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; reap it if it is our child.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    state = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def worker_pid(directory: Path) -> int | None:
    """The pid a node worker wrote in its ``directory`` (``service/node_worker.py``), if any."""
    pid_files = list(directory.glob("*.pid"))
    return int(pid_files[0].read_text()) if pid_files else None


# --- the federation -----------------------------------------------------------------
@dataclass
class Node:
    """One organisation's SuperNode: its key, ports, Flower home and state directory."""

    name: str
    partition_id: int
    root: Path
    worker: bool = False  # node-worker=true: messages run in the node's long-lived worker
    # --isolation process with dpfpl-superexec beside the SuperNode (ClientApps forked from
    # a warm process, docs/deployment.md); False: Flower starts its own flower-superexec
    forked: bool = False
    runtime_port: int = field(default_factory=free_port)
    node_id: int | None = None
    process: subprocess.Popen | None = None
    superexec: subprocess.Popen | None = None
    starts: int = 0

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / f"supernode-{self.starts}.log"

    @property
    def superexec_log(self) -> Path:
        return self.root / f"superexec-{self.starts}.log"

    @property
    def worker_pid(self) -> int | None:
        """The pid of this node's worker (``state-dir/workers``), if one is running."""
        return worker_pid(self.state_dir / "workers")


class Federation:
    """A SuperLink (TLS, node auth, database) and SuperNodes on loopback, under ``root``."""

    def __init__(self, root: Path, num_nodes: int) -> None:
        self.root = root
        self.num_nodes = num_nodes
        self.certs = root / "certs"
        self.registry = root / "registry"  # the registered keys, as every node holds them
        self.logs = root / "logs"
        self.runs = root / "runs"
        self.database = root / "superlink" / "state.db"
        self.flwr_home = root / "operator" / "flwr-home"
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.superlink_starts = 0
        self.nodes = [
            Node(f"supernode-{i}", i, root / "orgs" / f"supernode-{i}") for i in range(num_nodes)
        ]
        self._started: list[subprocess.Popen] = []
        self.supernode_env = dict(SUPERNODE_ENV)
        for path in (self.logs, self.runs, self.database.parent, self.flwr_home, self.registry):
            path.mkdir(parents=True, exist_ok=True)
        self.app = app_copy(root / "app")  # what the honest runs submit (see app_copy)

    # environment and CLI ------------------------------------------------------------
    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "FLWR_HOME": str(flwr_home or self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def cli(
        self, args: list[str], *, timeout: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` as the operator; output is appended to ``logs/cli.log``."""
        out = subprocess.run(
            ["timeout", str(int(timeout)), str(BIN / "flwr"), *args],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        with (self.logs / "cli.log").open("a") as log:
            log.write(f"$ flwr {' '.join(args)}\n{out.stdout}{out.stderr}\n")
        return out

    def cli_json(self, args: list[str], *, timeout: float = CLI_TIMEOUT_S) -> dict[str, Any]:
        out = self.cli([*args, "--format", "json"], timeout=timeout)
        start = out.stdout.find("{")
        if start < 0:
            raise AssertionError(f"flwr {args} printed no JSON:\n{out.stdout}\n{out.stderr}")
        return json.loads(out.stdout[start:])

    # credentials and connection ------------------------------------------------------
    def make_credentials(self, extra_keys: list[str]) -> None:
        """Run the users' script: CA, SuperLink certificate, one key per node (+ extras),
        and the SuperExec secret of each node that runs ``dpfpl-superexec``.
        """
        self._make_certs("superlink")
        for name in [n.name for n in self.nodes] + extra_keys:
            self._make_certs("node", name)
        for node in self.nodes:
            if node.forked:
                self._make_certs("secret", f"superexec-{node.name}")
        # The named connection `flwr run . orgs` uses (Flower 1.41 reads it from here).
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )

    # SuperLink -------------------------------------------------------------------------
    def start_superlink(self) -> None:
        self.superlink_starts += 1
        log = (self.logs / f"superlink-{self.superlink_starts}.log").open("w")
        self.superlink = self._spawn(
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                "--ssl-certfile", str(self.certs / "superlink.crt"),
                "--ssl-keyfile", str(self.certs / "superlink.key"),
                "--enable-supernode-auth",
                "--database", str(self.database),
                "--host", "127.0.0.1",
                "--port", str(self.port),
            ],
            log,
            self.env(self.root / "superlink" / "flwr-home"),
        )  # fmt: skip
        wait_cli(
            lambda: "Application startup complete" in self.superlink_log(self.superlink_starts),
            self._superlink_answers,
            60,
            "the SuperLink to answer `flwr list`",
        )

    def _superlink_answers(self) -> bool:
        """Whether ``flwr list`` succeeds; a call that timed out (no JSON) is a "not yet"."""
        out = self.cli(["list", CONNECTION, "--format", "json"], timeout=30)
        return '"success": true' in out.stdout

    def superlink_log(self, start: int | None = None) -> str:
        """The SuperLink's own log: of its ``start``-th start, or of all of them."""
        starts = [start] if start is not None else range(1, self.superlink_starts + 1)
        paths = [self.logs / f"superlink-{n}.log" for n in starts]
        return "".join(_strip_ansi(p.read_text()) for p in paths if p.exists())

    def kill_superlink(self) -> None:
        """A host crash: SIGKILL the SuperLink and everything it started."""
        assert self.superlink is not None
        end_pids(process_tree(self.superlink.pid), first=signal.SIGKILL)
        self.superlink.wait(timeout=10)

    # SuperNodes ------------------------------------------------------------------------
    def register(self, node: Node) -> int:
        """Register ``node``'s key with the SuperLink and add it to the organisations'
        registry every node checks secure-aggregation signatures against (both out of
        band, by the operator and the organisations).
        """
        public = self.certs / f"{node.name}.pub"
        reply = self.cli_json(["supernode", "register", str(public)])
        assert reply.get("success"), reply
        shutil.copy2(public, self.registry / public.name)
        node.node_id = int(reply["node-id"])
        return node.node_id

    def start_supernode(self, node: Node, *, key: str | None = None, extra: str = "") -> None:
        """Start ``node`` with its key, partition, state directory and own Flower home.

        Its secure rounds are signed with its node-auth key and checked against the
        registry (``docs/secure-aggregation.md``), as the compose files configure them.
        """
        node.starts += 1
        node.root.mkdir(parents=True, exist_ok=True)
        node_key = self.certs / (key or node.name)
        node_config = (
            f"partition-id={node.partition_id} num-partitions={self.num_nodes} "
            f"state-dir='{node.state_dir}' node-worker={'true' if node.worker else 'false'} "
            f"secagg-signing-key='{node_key}' secagg-registry='{self.registry}' "
            f"secagg-require-signed=true {extra}"
        )
        isolation: list[str] = []
        secret = self.certs / f"superexec-{node.name}.secret"
        if node.forked:
            isolation = ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        env = {**self.env(node.root / "flwr-home"), **self.supernode_env}
        node.process = self._spawn(
            [
                str(BIN / "flower-supernode"),
                "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.certs / "ca.crt"),
                "--auth-supernode-private-key", str(node_key),
                "--port", str(node.runtime_port),
                *isolation,
                "--node-config", node_config.strip(),
            ],
            node.log.open("w"),
            env,
        )  # fmt: skip
        if node.forked:  # as the compose files run it: its own process, the shared secret
            node.superexec = self._spawn(
                [
                    str(BIN / "dpfpl-superexec"),
                    "--insecure",  # the node's Runtime API on loopback, as Flower's own
                    "--runtime-api-address", f"127.0.0.1:{node.runtime_port}",
                    "--superexec-auth-secret-file", str(secret),
                ],
                node.superexec_log.open("w"),
                env,
            )  # fmt: skip

    def kill_supernode(self, node: Node) -> None:
        """A host crash: SIGKILL the SuperNode, its SuperExec and any running ClientApp."""
        assert node.process is not None
        roots = [p for p in (node.process, node.superexec) if p is not None]
        end_pids([pid for p in roots for pid in process_tree(p.pid)], first=signal.SIGKILL)
        for p in roots:
            p.wait(timeout=10)

    def online_node_ids(self) -> set[int]:
        listed = self.cli_json(["supernode", "list", CONNECTION])
        return {int(n["node-id"]) for n in listed.get("nodes", []) if n["status"] == "online"}

    def wait_activated(self, nodes: list[Node], timeout: float) -> None:
        """Until ``nodes`` are online, asking the CLI once the SuperLink logged their activation."""
        expected = {node.node_id for node in nodes}

        def logged() -> bool:
            text = self.superlink_log(self.superlink_starts)
            return all(f"Activated node_id={node_id}" in text for node_id in expected)

        wait_cli(
            logged,
            lambda: expected <= self.online_node_ids(),
            timeout,
            f"SuperNodes {sorted(map(str, expected))} online",
        )

    # runs ------------------------------------------------------------------------------
    def submit(self, app: Path, run_config: str) -> int:
        reply = self.cli_json(["run", str(app), CONNECTION, "--run-config", run_config])
        assert reply.get("success") is True, reply
        return int(reply["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        listed = self.cli_json(["list", CONNECTION, "--run-id", str(run_id)])
        return listed["runs"][0] if listed.get("success") and listed.get("runs") else {}

    def wait_finished(self, run_id: int, timeout: float) -> dict[str, Any]:
        """The run's JSON entry once its status is ``finished:*`` (fails on timeout)."""

        def finished() -> dict[str, Any] | None:
            info = self.run_info(run_id)
            return info if str(info.get("status", "")).startswith(FINISHED) else None

        ended = re.compile(rf"Finished task \d+ of run {run_id}\b")
        try:
            return wait_cli(
                lambda: bool(ended.search(self.superlink_log())),
                finished,
                timeout,
                f"run {run_id} to finish",
                fallback=60,  # only a run whose SuperLink was killed ends without the line
            )
        except AssertionError as err:
            tail = "\n".join(self.server_log(run_id).splitlines()[-40:])
            raise AssertionError(f"{err}; last ServerApp log lines:\n{tail}") from None

    def server_log(self, run_id: int) -> str:
        """The ServerApp's log as the SuperLink keeps it; saved under ``logs/``."""
        out = self.cli(["log", str(run_id), CONNECTION, "--show"], timeout=60)
        text = _strip_ansi(out.stdout + out.stderr)
        (self.logs / f"run-{run_id}.log").write_text(text)
        return text

    # teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """End every process we started (whole trees), then any straggler naming us."""
        pids: list[int] = []
        for proc in self._started:
            if proc.poll() is None:
                pids.extend(process_tree(proc.pid))
        end_pids(pids)
        tokens = [str(self.root), f"127.0.0.1:{self.port}"]
        tokens += [f"127.0.0.1:{n.runtime_port}" for n in self.nodes]
        end_pids(pids_naming(tokens), first=signal.SIGKILL)
        for proc in self._started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        leftovers = pids_naming(tokens)
        assert not leftovers, f"processes survived teardown: {leftovers}"

    def _make_certs(self, *args: str) -> None:
        subprocess.run(
            ["timeout", "60", "bash", str(MAKE_CERTS), args[0], str(self.certs), *args[1:]],
            check=True,
            capture_output=True,
        )

    def _spawn(self, argv: list[str], log: Any, env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            argv,
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()  # the child keeps its own descriptor
        self._started.append(proc)
        return proc


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def all_text(paths: list[Path]) -> dict[Path, bytes]:
    """Every file under ``paths`` (recursively), as bytes: what a secrets scan reads."""
    found: dict[Path, bytes] = {}
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            found[file] = file.read_bytes()
    return found


HOSTILE_APP = REPO / "tests" / "hostile_app"


def app_copy(dest: Path, *, replacements: tuple[tuple[str, str], ...] = ()) -> Path:
    """A directory holding only the app: its two entry points, ``dpfpl_app`` and the
    ``pyproject.toml`` (with ``replacements`` made in it), for ``flwr run``.

    ``flwr run DIR`` walks every file under DIR before it filters, and a checkout made
    by ``scripts/install.sh`` holds its ``.venv`` (55,000 files): on this 2-core machine
    that walk took 25 s (12 CPU-seconds) per run submitted from the checkout, against
    0.5 s from this copy. Each run's ServerApp and ClientApp code is the checkout's own;
    ``tests/test_flwr_run.py`` keeps ``flwr run`` of the checkout itself.
    """
    dest.mkdir(parents=True)
    for name in ("client_app.py", "server_app.py"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(
        REPO / "dpfpl_app", dest / "dpfpl_app", ignore=shutil.ignore_patterns("__pycache__")
    )
    text = (REPO / "pyproject.toml").read_text()
    for old, new in replacements:
        if text.count(old) != 1:
            raise AssertionError(f"pyproject.toml no longer has exactly one {old!r}")
        text = text.replace(old, new)
    # the copy holds only the app, so the project's fab-exclude patterns match nothing
    # (which Flower refuses): drop them
    text = "\n".join(line for line in text.splitlines() if not line.startswith("fab-exclude"))
    (dest / "pyproject.toml").write_text(text + "\n")
    return dest


def hostile_app_copy(dest: Path, *, cheating_server: bool = False) -> Path:
    """A copy of the app (``app_copy``) whose ClientApp is
    ``tests/hostile_app/hostile_client.py`` (and, with ``cheating_server``, whose
    ServerApp is ``cheating_server.py``).

    Only the copy's pyproject names the hostile apps (and another FAB name), so the
    real app never gains test-only behaviour.
    """
    replacements = [
        ('clientapp = "client_app:app"', 'clientapp = "hostile_client:app"'),
        ('name = "dpfpl"', 'name = "dpfpl-hostile"'),
    ]
    if cheating_server:
        replacements.append(('serverapp = "server_app:app"', 'serverapp = "cheating_server:app"'))
    app_copy(dest, replacements=tuple(replacements))
    for name in ("hostile_client.py", "cheating_server.py"):
        shutil.copy2(HOSTILE_APP / name, dest / name)
    return dest
