"""The node worker: the same handlers in a long-lived process, and nobody else's socket.

The federation tests drive the real ServerApp and ClientApp in one process with the
nodes' ``node-worker=true``: every message then crosses a real Unix socket to a real
``dpfpl node-worker`` process, started on first use. The deployment tests do the same
across SuperNodes (``test_deployment.py``, ``test_deployment_faults.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import context_to_proto, message_to_proto

import client_app as client_module
import server_app as server_module
from dpfpl_app.federation.node_worker_link import _connect, delegate_to_worker
from dpfpl_app.federation.worker_protocol import (
    WorkerError,
    check_socket_owner,
    code_fingerprint,
    ensure_private_dir,
    peer_uid,
    recv_frame,
    send_frames,
    socket_path,
)
from tests.deploy_processes import worker_pid
from tests.flower_harness import federation_config, make_instruction, run_server_app

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="acting as another user needs root")


def _kill_worker(directory: Path) -> int | None:
    """SIGKILL the worker of ``directory`` (a crash) and wait until all of it is gone.

    The worker is this process's child (started on first use from here). Its main thread
    turns zombie before its other threads have exited and released its socket, so wait
    for the reaping, which waits for the whole thread group.
    """
    pid = worker_pid(directory)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return pid


def _rounds(root: Path) -> list[dict[str, Any]]:
    doc = json.loads((root / "runs" / "t" / "results.json").read_text())
    assert doc["status"] == "completed", doc.get("error")
    return [{k: v for k, v in row.items() if k != "elapsed-s"} for row in doc["rounds"]]


@pytest.fixture(scope="module")
def worker_run(digits_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The same 2-node, 2-round federation (DP off: deterministic) run twice: in this
    process, and through node workers whose worker is killed after the first reply.
    """
    runs = {mode: _run_federation(mode, tmp_path_factory.mktemp(f"worker-{mode}"))
            for mode in ("false", "true")}  # fmt: skip
    try:
        yield runs
    finally:
        _kill_worker(runs["true"]["workers"])


def _run_federation(mode: str, root: Path) -> dict[str, Any]:
    workers = root / "w"
    cfg = federation_config(root, **{"min-nodes": 2, "dp-mode": "off", "num-server-rounds": 2})
    killed: list[int | None] = []
    captured: list[tuple[bytes, bytes]] = []

    def recording(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "evaluate" and not captured:
            captured.append((
                message_to_proto(msg).SerializeToString(),
                context_to_proto(context).SerializeToString(),
            ))  # fmt: skip
        return client_module.app(msg, context)

    def crash_after_first_reply(reply: Message) -> None:
        if mode == "true" and not killed:
            killed.append(_kill_worker(workers))

    run_server_app(
        server_module.app,
        client_app=recording,  # type: ignore[arg-type]
        num_nodes=2,
        run_config=cfg,
        node_configs=[{"node-worker": mode, "worker-dir": str(workers)}] * 2,
        on_reply=crash_after_first_reply,
    )
    return {"root": root, "workers": workers, "killed": killed, "message": captured[0]}


def test_federation_through_workers_equals_in_process_and_survives_a_worker_crash(
    worker_run: dict,
) -> None:
    on, off = worker_run["true"], worker_run["false"]
    # The worker answered (one killed after the first reply, a new one started on the
    # next message), and the run is metric for metric the in-process run: same handlers,
    # same private state carried through the context and the disk.
    (killed,) = on["killed"]
    assert killed is not None and worker_pid(on["workers"]) not in (None, killed)
    worker_logs = "\n".join(f.read_text()[-3000:] for f in on["workers"].glob("*.log"))
    assert _rounds(on["root"]) == _rounds(off["root"]), worker_logs
    assert not off["workers"].exists()  # node-worker=false starts nothing
    (sock,) = on["workers"].glob("*.sock")
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(on["workers"].stat().st_mode) == 0o700


REPLAY = """
import json, sys
from pathlib import Path
from flwr.common.serde import context_from_proto, message_from_proto
from flwr.proto.message_pb2 import Context, Message
import client_app
msg = message_from_proto(Message.FromString(Path(sys.argv[1]).read_bytes()))
ctx = context_from_proto(Context.FromString(Path(sys.argv[2]).read_bytes()))
ctx.node_config.update(json.loads(sys.argv[3]))
try:
    reply = client_app.app(msg, ctx)
    out = {"keys": sorted(reply.content.keys()), "state": sorted(ctx.state.keys())}
except Exception as err:
    out = {"error": f"{type(err).__name__}: {err}"}
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
"""


def _replay(run: dict, tmp_path: Path, **node_config: str) -> dict:
    """One ``flwr-clientapp``-like process: a recorded evaluate message, answered by the app."""
    message, context = run["message"]
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "ctx").write_bytes(context)
    config = {"node-worker": "true", "worker-dir": str(run["workers"]), **node_config}
    out = subprocess.run(
        [sys.executable, "-c", REPLAY, str(tmp_path / "msg"), str(tmp_path / "ctx"),
         json.dumps(config)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_clientapp_process_using_a_worker_never_imports_torch(
    worker_run: dict, tmp_path: Path
) -> None:
    answered = _replay(worker_run["true"], tmp_path)
    assert "error" not in answered, answered
    assert answered["torch"] is False
    assert answered["keys"] == ["metrics"]  # an evaluate reply: scalar metrics only
    assert "dpfpl.private" in answered["state"]  # the state came back for the SuperNode


def test_a_failure_in_the_worker_reaches_flower_with_its_reason(
    worker_run: dict, tmp_path: Path
) -> None:
    answered = _replay(worker_run["true"], tmp_path, **{"partition-id": "nine"})
    assert answered["error"].startswith("WorkerError: node worker: ValueError"), answered
    assert "'nine'" in answered["error"]


# --- nobody else's socket ----------------------------------------------------------------
def _context(**node_config: str) -> Context:
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})


def test_a_node_worker_value_other_than_true_or_false_is_refused() -> None:
    msg = make_instruction(RecordDict(), dst_node_id=2)
    with pytest.raises(WorkerError, match="use true or false"):
        delegate_to_worker(msg, _context(**{"node-worker": "yes"}), lambda m, c: m)


def test_a_worker_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with pytest.raises(WorkerError, match="chmod 700"):
        ensure_private_dir(tmp_path)
    ensure_private_dir(tmp_path / "fresh")
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700


@as_root
def test_a_socket_another_user_placed_is_never_handed_the_state(tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        path.chmod(0o600)
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(WorkerError, match="belongs to uid 65534"):
            check_socket_owner(path)
        os.chown(path, os.getuid(), os.getgid())
        path.chmod(0o666)
        with pytest.raises(WorkerError, match="0600"):
            check_socket_owner(path)


@as_root
def test_another_user_cannot_reach_a_running_worker() -> None:
    # a root every user can traverse, so only the worker's own directory and socket guard it
    root = Path(tempfile.mkdtemp(prefix="dpfpl-worker-", dir="/tmp"))
    root.chmod(0o755)
    directory = root / "w"
    worker = subprocess.Popen(
        [sys.executable, "-m", "dpfpl_app.service.cli", "node-worker", "--dir", str(directory),
         "--idle-exit", "60"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    path = socket_path(directory, code_fingerprint())
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _connects_as(NOBODY, path) is False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mine:
            mine.connect(str(path))  # its own user is served
            assert peer_uid(mine) == os.getuid()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        shutil.rmtree(root)
    assert worker.returncode == 0


def _connects_as(uid: int, path: Path) -> bool:
    """Whether a process running as ``uid`` can connect to the socket at ``path``."""
    child = os.fork()
    if child == 0:  # the child: become uid, try, report through the exit code
        code = 3
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(path))
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) in (0, 1), "the probe failed for another reason"
    return os.WEXITSTATUS(status) == 0


def test_a_worker_serves_only_the_exact_code_it_runs(tmp_path: Path) -> None:
    copies = []
    for name in ("a", "b"):
        copy = tmp_path / name
        copy.mkdir()
        shutil.copy2(REPO / "client_app.py", copy / "client_app.py")
        shutil.copytree(REPO / "dpfpl_app", copy / "dpfpl_app",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        copies.append(copy)
    # same content elsewhere (the FAB Flower unpacks vs. a checkout): the same worker
    assert code_fingerprint(copies[0]) == code_fingerprint(copies[1]) == code_fingerprint(REPO)
    config = copies[1] / "dpfpl_app" / "config.py"
    config.write_text(config.read_text() + "\n# another version\n")
    assert code_fingerprint(copies[1]) != code_fingerprint(copies[0])


def test_a_worker_deeper_than_the_unix_address_limit_still_answers(tmp_path: Path) -> None:
    directory = tmp_path / ("d" * 60) / ("e" * 60)  # > 108 bytes with the socket's name
    assert len(str(socket_path(directory, code_fingerprint()))) > 108
    try:
        with _connect(directory) as conn:  # starts the worker on first use
            send_frames(conn, b"ping")
            assert recv_frame(conn) == b"pong"
            assert recv_frame(conn).decode() == code_fingerprint()
        assert stat.S_IMODE(socket_path(directory, code_fingerprint()).stat().st_mode) == 0o600
    finally:
        _kill_worker(directory)
