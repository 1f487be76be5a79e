"""The class-prior frontier: how far an own-class bias on zero-shot gets, at best.

A client that knows which classes it holds can add a bias b >= 0 to those classes'
zero-shot logits and train nothing. Local accuracy rises with b, neighbour accuracy
falls; the frontier is the best harmonic mean over every b (an oracle per client, chosen
on its test images): an upper bound of what a pure class prior on top of zero-shot can
do, so a learned prompt that does not beat it has learned no more than the prior.

Exact, not a grid: an image's prediction changes with b only where b crosses its gap
g = (best other-class logit) - (best own-class logit): own class iff b > g. So every
distinct gap bounds an interval of b on which the counts are constant, and scanning one
b per interval (the sorted gaps, prefix counts) visits every point a grid of any
resolution could, b = +inf ("only own classes") included. b = 0 is zero-shot itself,
taken from its own argmax, so the frontier is never below zero-shot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dpfpl_app.method.accuracy import harmonic_mean


@dataclass(frozen=True)
class PriorPoint:
    """The best own-class bias of one client and the correct counts it gives."""

    bias: float  # a representative b of the best interval; inf: only own classes
    local_correct: int
    neighbour_correct: int


def prior_frontier(
    local_logits: Tensor,
    local_labels: Tensor,
    neighbour_logits: Tensor,
    neighbour_labels: Tensor,
    own_classes: tuple[int, ...],
) -> PriorPoint:
    """The bias b >= 0 with the best harmonic mean of local and neighbour accuracy.

    ``*_logits`` are zero-shot logits (n, C) of the client's local and neighbour test
    images. Ties between biases go to the smallest b (zero-shot first). A client
    without both kinds of test images, or holding no or every class, has no trade-off:
    its point is zero-shot's (b = 0).
    """
    zeroshot = PriorPoint(
        0.0,
        _correct(local_logits, local_labels),
        _correct(neighbour_logits, neighbour_labels),
    )
    n_local, n_neighbour = local_labels.numel(), neighbour_labels.numel()
    num_classes = local_logits.shape[1] if local_logits.dim() == 2 else 0
    own = torch.zeros(num_classes, dtype=torch.bool)
    own[list(own_classes)] = True
    if not (n_local and n_neighbour and 0 < int(own.sum()) < num_classes):
        return zeroshot
    local_gap, local_ok = _gaps(local_logits, local_labels, own, own_side=True)
    neighbour_gap, neighbour_ok = _gaps(neighbour_logits, neighbour_labels, own, own_side=False)
    # for b just above threshold t (up to the next one) an image goes to its own side
    # iff its gap <= t; b just above 0 differs from b = 0 only on exact ties
    thresholds = torch.unique(torch.cat([local_gap, neighbour_gap]).clamp(min=0.0))
    local_sorted = torch.sort(local_gap[local_ok]).values
    neighbour_sorted = torch.sort(neighbour_gap[neighbour_ok]).values
    local_hits = torch.searchsorted(local_sorted, thresholds, right=True)
    neighbour_hits = neighbour_sorted.numel() - torch.searchsorted(
        neighbour_sorted, thresholds, right=True
    )
    local_acc = local_hits.double() / n_local  # float64, as the server's check computes
    neighbour_acc = neighbour_hits.double() / n_neighbour
    total = local_acc + neighbour_acc
    hm = torch.where(total > 0, 2 * local_acc * neighbour_acc / total.clamp(min=1e-300), 0.0)
    i = int(torch.argmax(hm))  # the first best: the smallest bias
    if float(hm[i]) <= harmonic_mean(zeroshot.local_correct / n_local,
                                      zeroshot.neighbour_correct / n_neighbour):
        return zeroshot
    upper = float(thresholds[i + 1]) if i + 1 < thresholds.numel() else math.inf
    bias = math.inf if math.isinf(upper) else (float(thresholds[i]) + upper) / 2
    return PriorPoint(bias, int(local_hits[i]), int(neighbour_hits[i]))


def _gaps(logits: Tensor, labels: Tensor, own: Tensor, *, own_side: bool) -> tuple[Tensor, Tensor]:
    """Each image's gap (best other minus best own logit), and whether the side it falls
    to for large enough (own) or small enough (other) b predicts its label.
    """
    own_logits = logits.masked_fill(~own, -math.inf)
    other_logits = logits.masked_fill(own, -math.inf)
    own_max, own_arg = own_logits.max(dim=1)
    other_max, other_arg = other_logits.max(dim=1)
    ok = (own_arg if own_side else other_arg) == labels
    return (other_max - own_max).double(), ok


def _correct(logits: Tensor, labels: Tensor) -> int:
    return 0 if labels.numel() == 0 else int((logits.argmax(dim=1) == labels).sum())
