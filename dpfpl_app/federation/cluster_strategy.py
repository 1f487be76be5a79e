"""SecFPP's server: DP-FPL's secure strategy with one shared prompt per secure cluster.

Before its first training round (and again whenever the sampled nodes change) the
strategy clusters the nodes by their domain summaries under secure aggregation
(``secure_clustering``). It then holds k domain prompts. Each round every client
receives all k and the centroids, trains with its own cluster's prompt, and sends its
clipped gradient in its cluster's block of a k-block vector, zeros elsewhere
(``client_messages``). The secure sum therefore gives each cluster's summed gradient,
which the server divides by the cluster's size and applies to that cluster's prompt.
A client's DP noise covers the whole vector, so every block carries the noise of all
survivors and the accounting is DP-FPL's; every sampled node must survive a round
(``secure_channel.secagg_config``), so no block is ever summed over fewer members than
the clustering counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from dpfpl_app.config import RunConfig
from dpfpl_app.federation import domain_wire
from dpfpl_app.federation.secure_clustering import Clusters, SecureClustering
from dpfpl_app.federation.secure_strategy import SECURE_STAGE_TIMEOUT, SecureDPFPLStrategy

CLUSTERING_NOTE = (
    "SecFPP clustering: each client's clustering inputs and cluster choice are computed from "
    "its domain summary, released ONCE with Gaussian noise (summary-noise-multiplier, "
    "sensitivity summary-clip / (B / q)) and counted in the printed epsilon (per-sample DP). "
    "The server learns, per secure sum over all sampled clients, the number of clients "
    "nearest each candidate centroid and, for groups of at least min-cluster-size clients "
    "only, the sum of their summaries and squared distances; never a single client's "
    "message or its cluster. Differences of overlapping sums can still isolate one "
    "(anonymous) client's summary: a noised release, post-processing covered by the epsilon"
)


class SecFPPStrategy(SecureDPFPLStrategy):
    """``SecureDPFPLStrategy`` whose shared prompt is one per secure cluster (module docstring).

    ``cfg`` supplies the clustering's settings; every other argument is the parent's.
    """

    def __init__(self, *, cfg: RunConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not cfg.method.clustered or not self.channel.secure:
            raise ValueError("SecFPPStrategy runs method 'secfpp' under secure aggregation only")
        self._cfg = cfg
        self._prompt = self._prompt.unsqueeze(0)  # one domain until the nodes are clustered
        self.clusters: Clusters | None = None
        self._fresh: dict[str, float | int] = {}  # metrics of a clustering this round

    def summary(self) -> None:
        super().summary()
        log(INFO, "%s", CLUSTERING_NOTE)

    # --- what travels --------------------------------------------------------------
    def global_arrays(self) -> ArrayRecord:
        """All k domain prompts and the k centroids (the same broadcast for everyone)."""
        centroids = (
            self.clusters.centroids
            if self.clusters is not None
            else np.zeros((1, self._cfg.summary_dim))
        )
        return domain_wire.domain_record(self._prompt, centroids)

    def _adopt(self, arrays: ArrayRecord) -> None:
        prompts, _ = domain_wire.read_domains(arrays)
        if prompts.shape != self._prompt.shape:
            raise ValueError(
                f"arrays hold domain prompts of shape {tuple(prompts.shape)}, this strategy "
                f"holds {tuple(self._prompt.shape)}; pass strategy.global_arrays() to start()"
            )
        self._prompt = prompts

    # --- clustering ----------------------------------------------------------------
    def _before_secure_round(self, grid: Grid, nodes: list[int], round_: int) -> None:
        """Cluster the sample if it is new; the domain prompts restart from their mean."""
        if self.clusters is not None and set(nodes) == set(self.clusters.nodes):
            return
        if self.clusters is not None:
            log(INFO, "round %d: the sampled nodes changed since the clustering: re-clustering",
                round_)
        clusters = SecureClustering(
            self._cfg, nodes, grid=grid, round_=round_, timeout=SECURE_STAGE_TIMEOUT
        ).run()
        weights = torch.tensor(
            self.clusters.counts if self.clusters is not None else [1], dtype=torch.float64
        )
        start = (self._prompt.double() * weights.view(-1, 1, 1)).sum(0) / weights.sum()
        self._prompt = start.to(self._prompt.dtype).repeat(clusters.k, 1, 1)
        self.clusters = clusters
        self._fresh = {
            "clusters": clusters.k,
            "clustering-secure-sums": clusters.secure_sums,
            "clustering-s": round(clusters.seconds, 3),
            "smallest-cluster": min(clusters.counts),
        }

    # --- aggregation ---------------------------------------------------------------
    def _secure_mean(self, result: Any, survivors: int) -> tuple[torch.Tensor, float]:
        """Each cluster's block divided by its size (every member survived the round)."""
        assert self.clusters is not None  # a secure round always clusters first
        counts = torch.tensor(self.clusters.counts, dtype=torch.float64)
        total = torch.from_numpy(result.total).reshape(self._prompt.shape)
        mean = total / counts.view(-1, 1, 1)
        return mean, result.accounting().noise_std(survivors) / float(counts.min())

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The parent's step; a round that clustered also reports the clustering."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self._fresh and metrics is not None:
            self._train_metrics.update(self._fresh)
            metrics = MetricRecord({**dict(metrics), **self._fresh})
        self._fresh = {}
        return arrays, metrics

    # --- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["clusters"] = self.clusters.to_state() if self.clusters is not None else {}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the clustering with the prompts (a resumed run does not re-cluster)."""
        clusters = Clusters.from_state(state["clusters"]) if state.get("clusters") else None
        if clusters is not None:
            self._prompt = self._prompt[:1].repeat(clusters.k, 1, 1)
        super().load_state_dict(state)
        self.clusters = clusters

