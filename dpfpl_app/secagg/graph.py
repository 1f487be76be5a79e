"""The SecAgg+ neighbour graph: who masks with whom and who holds whose shares.

A Harary graph H(k, n) on a uniformly random ordering of the nodes (Bell et al. 2020):
place the nodes on a circle in random order and join each to the k/2 nearest on either
side. It is exactly k-regular, and the random ordering (from the OS CSPRNG, so no
client can predict or steer its neighbours) is what the SecAgg+ security argument needs.
For k = n - 1 the graph is complete, i.e. the original SecAgg.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence


def neighbour_graph(nodes: Sequence[int], degree: int) -> dict[int, tuple[int, ...]]:
    """``{node: sorted neighbours}``, k-regular, symmetric, no self-loops."""
    n = len(nodes)
    if degree == n - 1:
        return {v: tuple(sorted(u for u in nodes if u != v)) for v in nodes}
    if degree % 2 or not 2 <= degree < n - 1:
        raise ValueError(f"a Harary graph here needs an even degree in [2, {n - 2}], got {degree}")
    order = list(nodes)
    secrets.SystemRandom().shuffle(order)
    half = degree // 2
    return {
        order[i]: tuple(sorted(order[(i + s) % n] for s in range(-half, half + 1) if s))
        for i in range(n)
    }


def check_graph(graph: dict[int, tuple[int, ...]], degree: int) -> None:
    """ValueError unless ``graph`` is symmetric, loop-free and ``degree``-regular."""
    for v, nbrs in graph.items():
        if len(set(nbrs)) != degree or v in nbrs:
            raise ValueError(
                f"node {v} has {len(set(nbrs))} distinct neighbours (want {degree}) or a self-loop"
            )
        for u in nbrs:
            if v not in graph.get(u, ()):
                raise ValueError(f"edge {v}-{u} is not symmetric")


def share_holders(owner: int, peers: list[int]) -> list[int]:
    """Who holds Shamir shares of ``owner``'s secrets: its live neighbours and itself.

    The order is the shares' x-coordinates (x = index + 1), which client and server
    derive alike from the same peer list.
    """
    return sorted({*peers, owner})
