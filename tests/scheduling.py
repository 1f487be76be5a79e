"""How pytest-xdist hands the test modules to the test processes (``scripts/test.sh``).

Each module stays in one process (``--dist loadfile``), and the two deployment modules
share one: each runs a federation of ten real processes (SuperLink, SuperNodes, their
SuperExecs, node workers) that starts a Flower process for every message. Side by side
they kept a 2-core machine at load 10-21, where each took 35-40 min and Flower's and
Ray's 30 s start-up deadlines failed (``tests/priority.py``); one after the other each
has the CPU the computing tests leave it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from xdist.scheduler import LoadFileScheduling

DEPLOYMENT_MODULES = frozenset({"test_deployment.py", "test_deployment_faults.py"})
"""The modules that start a three-organisation federation (``deploy_federation.py``)."""

DEPLOYMENT_SCOPE = "tests/deployment-federations"


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the deployment modules' unit."""
    path = nodeid.split("::", 1)[0]
    return DEPLOYMENT_SCOPE if PurePosixPath(path).name in DEPLOYMENT_MODULES else path


class DeploymentsOneAfterTheOther(LoadFileScheduling):
    """``loadfile``, with the deployment modules as one unit of work."""

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)
