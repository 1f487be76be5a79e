"""Where dpfpl keeps what it builds and caches on a host, importable without torch.

Backbones, image features, node-local private state and node workers all live under
one root, so an operator moves or wipes dpfpl's footprint with one variable.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DPFPL_CACHE"


def cache_root() -> Path:
    """Root of the dpfpl cache: ``$DPFPL_CACHE``, else ``~/.cache/dpfpl``."""
    from_env = os.environ.get(CACHE_ENV)
    return Path(from_env) if from_env else Path.home() / ".cache" / "dpfpl"
