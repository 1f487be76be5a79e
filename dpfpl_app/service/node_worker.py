"""``dpfpl node-worker``: one long-lived process per organisation that answers its messages.

Flower runs every message in a fresh ``flwr-clientapp`` process; this worker keeps what
does not change between messages (torch, transformers, the frozen CLIP, the feature
files' page cache) loaded, and runs the ClientApp's own handlers on what the short-lived
process hands it (``federation/node_worker_link.py``). It holds no state of its own:
every request brings the node's context and takes the updated one back, and the
handlers write the private state to node-local disk as before.

It listens on a Unix socket only (0600, in a 0700 directory, named for the code it
runs), checks that every peer runs as its own user, answers one message at a time, and
with ``--idle-exit`` frees its memory when the federation goes quiet.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from dpfpl_app.federation.message_timing import serving_many_messages
from dpfpl_app.federation.worker_protocol import (
    NODE_WORKER,
    app_root,
    code_fingerprint,
    ensure_private_dir,
    peer_uid,
    recv_frame,
    send_frames,
    socket_path,
    unix_address,
)

logger = logging.getLogger(__name__)


def add_node_worker_command(sub: Any) -> None:
    p = sub.add_parser(
        "node-worker",
        help="keep this node's model loaded across Flower messages (with node-worker=true)",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="the SuperNode's worker-dir (default: $DPFPL_CACHE/workers, or what "
        "--node-config worker-dir / state-dir gives the node)",
    )
    p.add_argument(
        "--idle-exit", type=float, default=0.0,
        help="exit after this many seconds without a message (default 0: never)",
    )
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    from dpfpl_app.federation.worker_protocol import worker_dir

    directory = Path(args.dir).expanduser() if args.dir else worker_dir({})
    serve(directory, idle_exit=args.idle_exit)
    return 0


def serve(directory: Path, idle_exit: float = 0.0) -> None:
    """Answer messages on this code's socket in ``directory`` until idle or terminated."""
    ensure_private_dir(directory)
    serving_many_messages()
    fingerprint = code_fingerprint()
    path = socket_path(directory, fingerprint)
    server = _bind(path)
    bound = path.stat().st_ino
    pid_file = directory / f"{fingerprint}.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logger.info("node worker %s for %s listening on %s", os.getpid(), app_root(), path)
    try:
        server.settimeout(idle_exit or None)
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                logger.info("node worker: no message for %.0f s, exiting", idle_exit)
                return
            with conn:
                conn.settimeout(None)
                _answer(conn, fingerprint)
    finally:
        server.close()
        if path.exists() and path.stat().st_ino == bound:  # not a successor's socket
            path.unlink()
        pid_file.unlink(missing_ok=True)


def _bind(path: Path) -> socket.socket:
    """Bind ``path`` 0600 from the first instant; refuse if a live worker holds it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_address(path) as address:
            probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: its worker died
    else:
        raise RuntimeError(f"a node worker for this code already answers on {path}")
    finally:
        probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        with unix_address(path) as address:
            server.bind(address)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    server.listen(16)
    return server


def _answer(conn: socket.socket, fingerprint: str) -> None:
    """One request: ``ping``, or ``call`` with a message and its context."""
    uid = peer_uid(conn)
    if uid is not None and uid != os.getuid():
        logger.warning("node worker: refused a connection from uid %s", uid)
        return
    try:
        kind = recv_frame(conn)
        if kind == b"ping":
            send_frames(conn, b"pong", fingerprint.encode())
        elif kind == b"call":
            request = recv_frame(conn), recv_frame(conn)
            send_frames(conn, *_call(*request))
    except (EOFError, OSError) as err:  # the ClientApp process went away; the next one retries
        logger.warning("node worker: connection lost (%s)", err)


def _call(message_bytes: bytes, context_bytes: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Run the ClientApp on the request; reply (status, content or error, state, log lines)."""
    from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    lines = _LogLines()
    app_logger = logging.getLogger("dpfpl_app")
    app_logger.addHandler(lines)
    try:
        message = message_from_proto(ProtoMessage.FromString(message_bytes))
        context = context_from_proto(ProtoContext.FromString(context_bytes))
        # Run the handlers themselves here: without the key the mod does not forward again.
        context.node_config = {k: v for k, v in context.node_config.items() if k != NODE_WORKER}
        reply = _client_app()(message, context)
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        content = recorddict_to_proto(reply.content).SerializeToString()
        state = recorddict_to_proto(context.state).SerializeToString()
        outcome = (b"ok", content, state)
    except Exception as err:  # noqa: BLE001 - every failure goes back to Flower as the reply
        logger.exception("node worker: the message failed")
        outcome = (b"error", f"{type(err).__name__}: {err}".encode(), b"")
    finally:
        app_logger.removeHandler(lines)
    return (*outcome, "\n".join(lines.lines).encode())


def _client_app() -> Any:
    """The ClientApp object of the code this worker was started from."""
    root = str(app_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("client_app").app


class _LogLines(logging.Handler):
    """The handlers' log lines of one request, sent back for the SuperNode's own log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().replace("\n", " ")
        self.lines.append(f"{record.levelname} {text}")

