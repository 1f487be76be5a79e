"""SecFPP's secure adaptive clustering, driven over a Flower ``Grid`` (server side).

Every statistic the server receives is a SecAgg+ sum over ALL sampled nodes (a dropout
discards that sum and the phase is asked again): first the population's first and
second moments (its mean and principal axes, where random starts are drawn), then per
Lloyd iteration a ``count`` sum and a ``sum`` sum restricted to the slots the counts
opened (``domain_clusters`` says what each holds and why), and last a ``count`` of the
chosen clustering, whose per-cluster sizes divide the training sums. No message holds
a client's summary or cluster; sums over overlapping groups can still be differenced
down to one anonymous summary, but every summary is a noised DP release counted in the
run's epsilon (``docs/secfpp.md``), so that is all a difference can show.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from dpfpl_app.config import RunConfig
from dpfpl_app.federation.secure_client import CLUSTERING, config_for_purpose
from dpfpl_app.federation.secure_round import SecureRound
from dpfpl_app.method import domain_clusters as dc

CLUSTER_RECORD = "secfpp"  # phase and layout of a clustering sum
CLUSTER_ARRAYS = "secfpp-arrays"  # the centroids and which slots are open
ATTEMPTS = 3  # a phase whose sum is discarded (a dropout) is asked this many times


@dataclass(frozen=True)
class Clusters:
    """The clustering the domain prompts follow; all of it is known to the server."""

    nodes: tuple[int, ...]
    centroids: np.ndarray  # (k, summary-dim)
    counts: tuple[int, ...]  # members per cluster (the final count sum)
    scores: dict[int, float]  # BIC of the best eligible restart per k
    secure_sums: int  # secure rounds the clustering took (retries included)
    seconds: float

    @property
    def k(self) -> int:
        return len(self.counts)

    def to_state(self) -> dict[str, Any]:
        """JSON-able (the server checkpoint's metadata)."""
        return {
            "nodes": list(self.nodes),
            "centroids": self.centroids.tolist(),
            "counts": list(self.counts),
            "scores": {str(k): v for k, v in self.scores.items()},
            "secure_sums": self.secure_sums,
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Clusters:
        return cls(
            nodes=tuple(int(n) for n in state["nodes"]),
            centroids=np.asarray(state["centroids"], dtype=np.float64),
            counts=tuple(int(c) for c in state["counts"]),
            scores={int(k): float(v) for k, v in state["scores"].items()},
            secure_sums=int(state["secure_sums"]),
            seconds=float(state["seconds"]),
        )


class SecureClustering:
    """One clustering of ``nodes``: ``run()`` returns the ``Clusters``."""

    def __init__(
        self, cfg: RunConfig, nodes: list[int], *, grid: Grid, round_: int, timeout: float
    ) -> None:
        self.cfg, self.nodes = cfg, list(nodes)
        self._grid, self._round, self._timeout = grid, round_, timeout
        digest = hashlib.sha256(f"secfpp-starts/{cfg.seed}/{round_}".encode()).digest()
        self._rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))  # public
        self.secure_sums = 0

    def run(self) -> Clusters:
        start = time.perf_counter()
        cfg, n, dim = self.cfg, len(self.nodes), self.cfg.summary_dim
        one = dc.Layout((1,))
        population = dc.Population.from_total(
            self._sum("moments", one, np.zeros((1, dim)), np.ones(1, dtype=bool)), dim
        )
        layout = dc.Layout.search(cfg.max_clusters, cfg.cluster_restarts)
        centroids = dc.initial_centroids(layout, population, self._rng)
        for iteration in range(cfg.cluster_iterations):
            counts = self._counts(layout, centroids)
            stats = self._stats(layout, centroids, counts >= cfg.min_cluster_size)
            centroids = dc.lloyd_update(centroids, stats, layout, population, self._rng)
            log(INFO, "secure clustering: iteration %d/%d, squared error per k %s", iteration + 1,
                cfg.cluster_iterations, _best_sse(layout, stats))
        scores = dc.candidate_scores(layout, stats.counts, stats.sse, n, dim, cfg.min_cluster_size)
        for k, (_, index) in sorted(scores.items(), key=lambda kv: -kv[1][0]):
            lo, hi = layout.bounds[index]
            final = self._counts(dc.Layout((k,)), centroids[lo:hi])
            if (final >= cfg.min_cluster_size).all():
                clusters = Clusters(
                    nodes=tuple(self.nodes),
                    centroids=centroids[lo:hi].copy(),
                    counts=tuple(int(c) for c in final),
                    scores={k: s for k, (s, _) in scores.items()},
                    secure_sums=self.secure_sums,
                    seconds=time.perf_counter() - start,
                )
                log(INFO, "secure clustering: k=%d chosen (BIC %s), cluster sizes %s, "
                    "%d secure sums in %.1fs", k, _rounded(clusters.scores), list(clusters.counts),
                    self.secure_sums, clusters.seconds)
                return clusters
            log(WARNING, "secure clustering: k=%d would leave a cluster below min-cluster-size"
                "=%d with its moved centroids: next best k", k, cfg.min_cluster_size)
        raise RuntimeError("secure clustering found no eligible k (k = 1 always is: a bug)")

    def _counts(self, layout: dc.Layout, centroids: np.ndarray) -> np.ndarray:
        ones = np.ones(layout.slots, dtype=bool)
        return np.rint(self._sum("count", layout, centroids, ones))

    def _stats(self, layout: dc.Layout, centroids: np.ndarray, open_: np.ndarray) -> dc.SlotStats:
        total = self._sum("sum", layout, centroids, open_)
        return dc.SlotStats.from_total(total, layout, self.cfg.summary_dim)

    def _sum(
        self, phase: str, layout: dc.Layout, centroids: np.ndarray, open_: np.ndarray
    ) -> np.ndarray:
        """One secure sum of the clients' ``phase`` vectors, asked again after a discard."""
        d = self.cfg.summary_dim
        dim = {"moments": d + 1 + d * d, "count": layout.slots}.get(phase, layout.slots * (d + 2))
        content = RecordDict(
            {
                CLUSTER_RECORD: ConfigRecord({"phase": phase, "ks": list(layout.ks)}),
                CLUSTER_ARRAYS: ArrayRecord(
                    {
                        "centroids": Array(np.ascontiguousarray(centroids, dtype=np.float64)),
                        "open": Array(open_.astype(np.uint8)),
                    }
                ),
            }
        )
        for attempt in range(1, ATTEMPTS + 1):
            self.secure_sums += 1
            secure = SecureRound(
                config_for_purpose(self.cfg, CLUSTERING, dim),
                self.nodes,
                grid=self._grid,
                round_=self._round,
                timeout=self._timeout,
                purpose=CLUSTERING,
            )
            result = secure.run_query(content)
            if result is not None:
                return np.asarray(result.total, dtype=np.float64)
            log(WARNING, "secure clustering: %s sum discarded (attempt %d of %d): %s", phase,
                attempt, ATTEMPTS, secure.record.reason)
        raise RuntimeError(
            f"secure clustering: the {phase} sum was discarded {ATTEMPTS} times (a node dropped "
            "out each time; every sampled node must answer). Check the nodes' logs and rerun"
        )


def _best_sse(layout: dc.Layout, stats: dc.SlotStats) -> dict[int, float]:
    best: dict[int, float] = {}
    for lo, hi in layout.bounds:
        total = float(stats.sse[lo:hi].sum())
        best[hi - lo] = round(min(best.get(hi - lo, math.inf), total), 4)
    return best


def _rounded(scores: dict[int, float]) -> dict[int, float]:
    return {k: round(v, 1) for k, v in sorted(scores.items())}
