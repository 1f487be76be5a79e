"""Where a node keeps a run's private state and exported prompt: one layout, two readers.

The node builds real paths from it (``client_node.state_directory``); the server, which
never sees a node's filesystem, uses the same layout to tell the user in results.json
where each client's exported prompt is on that client's host.
"""

from __future__ import annotations

from pathlib import PurePosixPath

PROMPT_FILE = "prompt.safetensors"
DEFAULT_STATE_ROOT = "$DPFPL_CACHE/state"
"""How the server names a node's default state root (``~/.cache/dpfpl/state`` there)."""


def run_state_name(run_name: str, run_id: int) -> str:
    """A run's state subdirectory: its ``run-name``, else ``run-<ID>``."""
    return run_name or f"run-{run_id}"


def partition_subdir(run_name: str, run_id: int, partition_id: int) -> PurePosixPath:
    """``<run>/partition-<id>``, relative to a node's state root."""
    return PurePosixPath(run_state_name(run_name, run_id)) / f"partition-{partition_id}"


def prompt_path_on_node(state_dir: str, run_name: str, run_id: int, partition_id: int) -> str:
    """The exported prompt's path on the node, as far as the run config can tell.

    A node started with its own ``--node-config state-dir`` keeps it under that root
    instead; the subdirectory is the same.
    """
    root = state_dir or DEFAULT_STATE_ROOT
    return str(PurePosixPath(root) / partition_subdir(run_name, run_id, partition_id) / PROMPT_FILE)
