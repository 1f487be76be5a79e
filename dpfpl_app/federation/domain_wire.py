"""What SecFPP's server broadcasts: every cluster's domain prompt and every centroid.

Every client receives all k domain prompts and the k centroids and picks its own
cluster locally (the centroid nearest its released summary), so the broadcast is the
same for all and says nothing about who is in which cluster. The pick is a function of
the client's noised summary (released once, kept in its private state) and the public
centroids only: post-processing, nothing about it is sent.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from dpfpl_app.federation.wire import PROMPT_DTYPE

DOMAIN_PROMPTS = "domain-prompts"
CENTROIDS = "centroids"


def domain_record(prompts: torch.Tensor, centroids: np.ndarray) -> ArrayRecord:
    """The broadcast: ``prompts`` (k, n_ctx, d) and ``centroids`` (k, summary-dim)."""
    return ArrayRecord(
        {
            DOMAIN_PROMPTS: Array(prompts.detach().to(PROMPT_DTYPE).contiguous()),
            CENTROIDS: Array(np.ascontiguousarray(centroids, dtype=np.float64)),
        }
    )


def read_domains(arrays: ArrayRecord) -> tuple[torch.Tensor, np.ndarray]:
    """``(prompts, centroids)`` out of a broadcast; ValueError names what is wrong."""
    if set(arrays.keys()) != {DOMAIN_PROMPTS, CENTROIDS}:
        raise ValueError(
            f"a SecFPP broadcast holds exactly {DOMAIN_PROMPTS!r} and {CENTROIDS!r}, got "
            f"{sorted(arrays.keys())}: server and client run different methods"
        )
    prompts = torch.from_numpy(np.array(arrays[DOMAIN_PROMPTS].numpy(), copy=True))
    centroids = np.array(arrays[CENTROIDS].numpy(), dtype=np.float64, copy=True)
    if prompts.dim() != 3 or prompts.dtype != PROMPT_DTYPE or not bool(prompts.isfinite().all()):
        raise ValueError(
            f"{DOMAIN_PROMPTS!r} must be a finite 3-D {PROMPT_DTYPE} tensor (k, n_ctx, d), got "
            f"shape {tuple(prompts.shape)} dtype {prompts.dtype}"
        )
    if centroids.ndim != 2 or centroids.shape[0] != prompts.shape[0]:
        raise ValueError(
            f"{CENTROIDS!r} has shape {centroids.shape}, expected ({prompts.shape[0]}, dim): "
            "one centroid per domain prompt"
        )
    return prompts, centroids


def own_cluster(summary: np.ndarray, centroids: np.ndarray) -> int:
    """The client's cluster: the centroid nearest its released ``summary`` (on the client)."""
    if centroids.shape[1] != summary.size:
        raise ValueError(
            f"centroids have {centroids.shape[1]} coordinates, this client's summary "
            f"{summary.size}: server and client use different summary-dim"
        )
    return int(np.argmin(((centroids - summary) ** 2).sum(axis=1)))
