"""What a ClientApp process and its node worker agree on: socket, code identity, frames.

A node worker (``dpfpl node-worker``, ``service/node_worker.py``) keeps the frozen CLIP,
the imports and the feature cache in memory across messages; the short-lived
``flwr-clientapp`` process hands it each message over a Unix socket
(``node_worker_link.py``). What crosses that socket is the node's own context, private
state included, so both ends hold it to the same rules:

* the socket lives in a directory only its user can enter (0700) and is itself 0600:
  no other user of the host can connect, and no TCP port is ever opened;
* a client connects only to a socket owned by its own user, in a directory nobody else
  can write (else another user could stand in for the worker and read the state);
* the socket is named for the exact code it runs (``code_fingerprint``): a worker left
  from another version of the app is never handed a message.

Light on purpose: it is imported by every ClientApp process, which must not pay for torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import dpfpl_app

NODE_WORKER = "node-worker"
"""Node config: ``true`` hands every message to the node's worker; ``false`` (default) not."""
WORKER_DIR = "worker-dir"
"""Node config: where the worker's socket, pid and log live (default: see ``worker_dir``)."""

_LENGTH = struct.Struct(">Q")
MAX_FRAME = 1 << 31
"""A frame larger than this is a broken peer, not a message (2 GiB)."""
SOCKET_PATH_MAX = 100
"""Unix socket addresses hold 108 bytes on Linux, 104 on macOS; keep a margin."""


class WorkerError(RuntimeError):
    """The node worker could not be used, or failed to answer; the text says why and how."""


def app_root() -> Path:
    """The directory holding ``client_app.py`` and ``dpfpl_app/`` (the app as installed)."""
    return Path(dpfpl_app.__file__).resolve().parent.parent


def code_fingerprint(root: Path | None = None) -> str:
    """A hash of the code a worker would run: every app source file and the interpreter.

    Content, not paths: the copy Flower unpacks from the FAB and the operator's checkout
    of the same version share a worker; a different version never does.
    """
    root = root or app_root()
    digest = hashlib.sha256(sys.executable.encode())
    files = [root / "client_app.py", *sorted((root / "dpfpl_app").rglob("*.py"))]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def worker_dir(node_config: dict) -> Path:
    """``worker-dir`` if set, else ``<state-dir>/workers``, else ``$DPFPL_CACHE/workers``."""
    from dpfpl_app.cache import cache_root

    if node_config.get(WORKER_DIR):
        return Path(str(node_config[WORKER_DIR])).expanduser()
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])).expanduser() / "workers"
    return cache_root() / "workers"


def socket_path(directory: Path, fingerprint: str) -> Path:
    """The socket of the worker running ``fingerprint``'s code in ``directory``."""
    return directory / f"{fingerprint}.sock"


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for ``bind``/``connect`` that reaches ``path`` however deep it is.

    A Unix socket address holds at most 108 bytes (104 on macOS), less than many state
    directories. Past that, Linux reaches the socket through an open descriptor of its
    directory (``/proc/self/fd/N/name``); elsewhere the path must be short enough.
    """
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
        yield str(path)
        return
    if not Path("/proc/self/fd").is_dir():
        raise WorkerError(
            f"node worker socket path {path} is longer than {SOCKET_PATH_MAX} bytes, the "
            f"limit of Unix sockets: set a shorter --node-config \"{WORKER_DIR}=...\""
        )
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` 0700, or check an existing one is this user's and closed to others."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = directory.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise WorkerError(
            f"node worker directory {directory} must belong to this user (uid {os.getuid()}) "
            f"and be closed to others, but it is uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):o}: run `chmod 700 {directory}` or choose another "
            f"--node-config \"{WORKER_DIR}=...\""
        )


def check_socket_owner(path: Path) -> None:
    """Refuse a socket that another user could have placed or could open."""
    info = path.lstat()
    if not stat.S_ISSOCK(info.st_mode):
        raise WorkerError(f"{path} is not a socket: remove it, the node worker will recreate it")
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise WorkerError(
            f"{path} belongs to uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}; "
            f"a node worker socket must be this user's (uid {os.getuid()}) and 0600: the "
            "private state would be handed to whoever answers it. Remove it"
        )


def peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's uid (Linux ``SO_PEERCRED``); None where the OS has no such call."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def send_frames(conn: socket.socket, *frames: bytes) -> None:
    conn.sendall(b"".join(_LENGTH.pack(len(frame)) + frame for frame in frames))


def recv_frame(conn: socket.socket) -> bytes:
    """One length-prefixed frame; ``EOFError`` if the peer went away before sending it."""
    (length,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size))
    if length > MAX_FRAME:
        raise WorkerError(f"node worker frame of {length} bytes exceeds {MAX_FRAME}")
    return _recv_exact(conn, length)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = conn.recv(min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
