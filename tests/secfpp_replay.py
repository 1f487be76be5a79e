"""SecFPP's server clustering replayed on exact sums: what a server learns, without a grid.

SecAgg+ releases the sum of every sampled client's ``client_vector`` (to 2^-16 after
quantisation). ``ExactSums`` runs the production ``SecureClustering.run`` with each
secure sum replaced by that exact total and records every release, so tests and
``benchmarks/secfpp_noise.py`` can replay the clustering and attack its releases.
"""

from __future__ import annotations

import numpy as np

from dpfpl_app.config import RunConfig
from dpfpl_app.federation.secure_clustering import SecureClustering
from dpfpl_app.method import domain_clusters as dc


class ExactSums(SecureClustering):
    """The server's clustering over clients' ``points``; ``released`` is what it learned."""

    def __init__(self, cfg: RunConfig, points: list[np.ndarray]) -> None:
        super().__init__(cfg, list(range(len(points))), grid=None, round_=1, timeout=0.0)  # type: ignore[arg-type]
        self.points = points
        self.released: list[tuple[str, dc.Layout, np.ndarray, np.ndarray]] = []

    def _sum(
        self, phase: str, layout: dc.Layout, centroids: np.ndarray, open_: np.ndarray
    ) -> np.ndarray:
        self.secure_sums += 1
        total = np.sum([dc.client_vector(phase, p, centroids, layout, open_)
                        for p in self.points], axis=0)
        self.released.append((phase, layout, open_.copy(), total))
        return total
