"""The ClientApp side of the node worker: a Flower mod that hands each message over.

In a deployment Flower starts a fresh ``flwr-clientapp`` process for every message, and
importing torch and transformers and loading the frozen CLIP cost seconds each time. With
``--node-config "node-worker=true"`` this mod sends the message and the node's context to
a long-lived worker on the same host (``service/node_worker.py``), which runs the same
handlers and returns the reply and the updated context. Nothing else changes: the
private state still comes from and goes back to ``context.state`` and node-local disk
every message, so killing the worker loses nothing; the next message starts a new one.

The worker is started on first use (detached, idle-exit) unless the operator already
runs ``dpfpl node-worker`` for this code.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from logging import INFO, getLevelName
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.common.serde import (
    context_to_proto,
    message_to_proto,
    recorddict_from_proto,
)
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from dpfpl_app.federation.message_timing import MessageTimes
from dpfpl_app.federation.worker_protocol import (
    NODE_WORKER,
    WorkerError,
    app_root,
    check_socket_owner,
    code_fingerprint,
    ensure_private_dir,
    recv_frame,
    send_frames,
    socket_path,
    unix_address,
    worker_dir,
)

START_TIMEOUT = 120.0
"""Seconds a worker started on first use has to open its socket (it imports nothing heavy first)."""
IDLE_EXIT = 900.0
"""A worker started on first use exits after this many idle seconds, freeing the model."""


def delegate_to_worker(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the message here, or in the node's worker if its node config has ``node-worker=true``."""
    setting = str(context.node_config.get(NODE_WORKER, "false")).lower()
    if setting == "false":
        return call_next(msg, context)
    if setting != "true":
        raise WorkerError(
            f"node config {NODE_WORKER}={context.node_config[NODE_WORKER]!r}: use true or false "
            "(start the SuperNode with a corrected --node-config)"
        )
    times = MessageTimes()
    with times.part("handed to the worker and answered"), _connect(
        worker_dir(dict(context.node_config))
    ) as conn:
        request = (message_to_proto(msg), context_to_proto(context))
        try:
            send_frames(conn, b"call", *(part.SerializeToString() for part in request))
            status, first, second, logs = (recv_frame(conn) for _ in range(4))
        except (EOFError, ConnectionError):  # never retried: it may have trained already
            raise WorkerError(
                "the node worker died while handling this message (see its log in the "
                "worker directory); the next message starts a new one"
            ) from None
    for line in logs.decode().splitlines():  # the handlers' log lines, shown where Flower's are
        level, _, text = line.partition(" ")
        log(getLevelName(level), "%s", text)
    log(INFO, "%s", times.line(f"{msg.metadata.message_type}, through the node worker"))
    if status != b"ok":
        raise WorkerError(f"node worker: {first.decode()}")
    state = recorddict_from_proto(ProtoRecordDict.FromString(second))
    for key in list(context.state.keys()):  # Flower keeps the context object it handed us
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return Message(recorddict_from_proto(ProtoRecordDict.FromString(first)), reply_to=msg)


@contextlib.contextmanager
def _connect(directory: Path) -> Iterator[socket.socket]:
    """A connection to this code's worker in ``directory``, starting one if none answers."""
    ensure_private_dir(directory)
    fingerprint = code_fingerprint()
    path = socket_path(directory, fingerprint)
    conn = _try_connect(path)
    if conn is None:
        with _lock(directory / f"{fingerprint}.lock"):
            conn = _try_connect(path) or _start(directory, path)
    with conn:
        yield conn


def _try_connect(path: Path) -> socket.socket | None:
    if not os.path.lexists(path):
        return None
    check_socket_owner(path)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_address(path) as address:
            conn.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        conn.close()
        return None  # a worker that died: its socket is stale
    return conn


def _start(directory: Path, path: Path) -> socket.socket:
    """Start a detached worker for this code (we hold the lock) and connect to it."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale: nothing answered it, and it is ours (checked on connect)
    root = app_root()
    log_path = directory / f"{path.stem}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    paths = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    log(INFO, "dpfpl: starting the node worker (log: %s)", log_path)
    try:
        subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            [sys.executable, "-m", "dpfpl_app.service.cli", "node-worker", "--dir",
             str(directory), "--idle-exit", str(IDLE_EXIT)],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
            start_new_session=True, close_fds=True,
        )
    finally:
        os.close(fd)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if (conn := _try_connect(path)) is not None:
            return conn
        time.sleep(0.05)
    raise WorkerError(
        f"the node worker did not open {path} within {START_TIMEOUT:.0f} s: see {log_path}"
    )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One starter at a time: two messages arriving together start one worker, not two."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
