"""SecFPP's adaptive k-means on secure aggregates: the arithmetic of both sides (numpy).

**What a client summarises.** Its domain: the sum over its training images of
(image feature - its class's zero-shot text feature), projected by a public random
orthonormal matrix to ``summary-dim`` numbers and clipped per image to ``summary-clip``,
divided by the client's PUBLIC size ``B / q`` (``clipped_mean``). One image moves it by
at most ``summary-clip / (B / q)``; the client adds Gaussian noise for that sensitivity
ONCE (``release``), keeps the result, and clusters by its direction, the unit vector
``z`` (``point``). Everything below is post-processing of that release. Why image features and
not a locally adapted prompt: a client's images carry its domain (scanner, style,
modality) whatever classes it holds, while a prompt adapted for a few steps mostly
encodes WHICH classes it holds, the class-level heterogeneity SecFPP keeps in the
private prompt. Why centred on the class's text feature: CLIP's pretraining aligned an
image with its class's text, so the difference removes the class to first order and
keeps what the domain did to the image. Measured on the benchmark (``domain-digits``,
12 clients, 3 styles, 2-4 classes each): k-means on the raw mean features mixes the
domains (adjusted Rand 0.50), on the centred ones it recovers them (1.0); at the
default noise, ``benchmarks/results/secfpp-noise.md``. It costs no training.

**What the server learns.** Candidates (k, restart) run Lloyd's iterations in lockstep;
each candidate is a block of k centroid *slots*. Per iteration, two secure sums over
all sampled clients: the ``count`` phase gives each slot's number of members; the
``sum`` phase gives, for the slots with at least ``min-cluster-size`` members only
(*open* slots), the sum of the members' summaries, their number and their squared
distances to the slot's centroid. A client contributes to one slot per candidate, the
nearest centroid, computed locally: no one else learns its summary or its slots. A
slot below the threshold is never opened: the server learns only that it is small.
Differences of overlapping sums can still isolate one client's ``z``: a noised release.

**Choosing k** from these aggregates alone: the Bayesian information criterion of a
spherical Gaussian mixture with the k-means partition (Pelleg and Moore's X-means
score), computed from the slots' counts and squared errors; the best restart per k
(least squared error) competes, and a candidate with any slot below the threshold
cannot win. The score's pooled variance needs n > k.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

SUMMARY_PURPOSE = "secfpp-summary"
SCALE = 2.0**16  # fixed-point units per unit of a statistic (resolution 1.5e-5)
PHASES = ("moments", "count", "sum")


@dataclass(frozen=True)
class Layout:
    """The candidates of one secure sum: ``ks[i]`` centroid slots for candidate i.

    Slots are numbered candidate after candidate; ``bounds[i]`` is candidate i's range.
    """

    ks: tuple[int, ...]

    @classmethod
    def search(cls, max_clusters: int, restarts: int) -> Layout:
        """K = 1 once (its restarts would coincide), every k >= 2 ``restarts`` times."""
        return cls((1, *(k for k in range(2, max_clusters + 1) for _ in range(restarts))))

    @property
    def slots(self) -> int:
        return sum(self.ks)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        ends = np.cumsum(self.ks).tolist()
        return [(end - k, end) for k, end in zip(self.ks, ends, strict=True)]


def image_vectors(
    features: np.ndarray, labels: np.ndarray, class_text: np.ndarray, dim: int, seed: int
) -> np.ndarray:
    """Per image (N, dim): its class-centred feature through the public projection.

    ``features`` (N, e) are the client's normalised image features, ``class_text``
    (C, e) the template's text features of every class (public: the frozen model's).
    The projection has orthonormal columns (``dim <= e``), so a vector's norm never
    grows: a centred vector of two unit features has norm at most 2.
    """
    centred = np.asarray(features, dtype=np.float64) - np.asarray(class_text)[labels]
    return centred @ _projection(centred.shape[1], dim, seed)


def _projection(width: int, dim: int, seed: int) -> np.ndarray:
    """The public random projection (width, dim), from the run's seed."""
    digest = hashlib.sha256(f"{SUMMARY_PURPOSE}/{seed}/{width}/{dim}".encode()).digest()
    gaussian = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(
        (width, max(dim, width))
    )
    return np.linalg.qr(gaussian.T)[0][:, :dim] if dim <= width else gaussian


def clipped_mean(vectors: np.ndarray, *, clip: float, size: float) -> np.ndarray:
    """The summary before noise: per-image vectors clipped to ``clip``, summed, / ``size``.

    ``size`` is PUBLIC (the client's declared size, ``B / q``), never the number of rows,
    so adding or removing one image moves the result by at most ``clip / size`` (L2):
    the sensitivity ``release`` calibrates its noise to.
    """
    if not (clip > 0 and size > 0):
        raise ValueError(f"clip ({clip}) and size ({size}) must be positive")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    return (vectors * scale).sum(axis=0) / size


def release(
    mean: np.ndarray, standard_normal: np.ndarray, *, clip: float, size: float,
    noise_multiplier: float,
) -> np.ndarray:
    """The client's one DP release: ``mean`` + N(0, (z clip / size)^2) per coordinate.

    ``standard_normal`` is N(0, 1) per coordinate from a secret source (the caller's
    ``NoiseSource``). A Gaussian mechanism of multiplier ``noise_multiplier`` on the
    sensitivity ``clip / size`` of ``clipped_mean``: RDP ``a / (2 z^2)`` at order a,
    once per run. Everything the clustering and the training do with the summary
    afterwards is post-processing of this vector (``point``).
    """
    if standard_normal.shape != mean.shape:
        raise ValueError(f"noise of shape {standard_normal.shape} for a summary {mean.shape}")
    std = noise_multiplier * clip / size
    return np.asarray(mean, dtype=np.float64) + std * np.asarray(standard_normal, np.float64)


def point(released: np.ndarray) -> np.ndarray:
    """The clustering's point of a released summary: its direction (a unit vector).

    Post-processing of the release. Unit norm keeps every clustering input inside
    ``input_bound`` and makes clients of one domain comparable whatever their size.
    """
    norm = float(np.linalg.norm(released))
    if not norm > 0:
        raise ValueError("the client's released summary is zero: no direction to cluster")
    return np.asarray(released, dtype=np.float64) / norm


def nearest(z: np.ndarray, centroids: np.ndarray, layout: Layout) -> list[int]:
    """The slot of ``z`` in each candidate (ties to the lower slot)."""
    dist = ((centroids - z) ** 2).sum(axis=1)
    return [lo + int(np.argmin(dist[lo:hi])) for lo, hi in layout.bounds]


def client_vector(
    phase: str, z: np.ndarray, centroids: np.ndarray, layout: Layout, open_slots: np.ndarray
) -> np.ndarray:
    """A client's input to one secure sum: its slot per candidate, as the phase asks.

    ``moments``: ``[z, 1, z z^T]`` (the layout is ignored). ``count``: a one-hot per
    candidate (length = slots). ``sum``: per slot ``[z, 1, ||z - centroid||^2]`` in its
    slot if that slot is open, zeros elsewhere.
    """
    if phase == "moments":  # the population's first and second moments, once
        return np.concatenate([z, [1.0], np.outer(z, z).ravel()])
    if centroids.shape != (layout.slots, z.size):
        raise ValueError(
            f"centroids have shape {centroids.shape}, the layout needs ({layout.slots}, {z.size})"
        )
    mine = nearest(z, centroids, layout)
    if phase == "count":
        out = np.zeros(layout.slots)
        out[mine] = 1.0
        return out
    if phase != "sum":
        raise ValueError(f"unknown clustering phase {phase!r}; expected one of {PHASES}")
    rows = np.zeros((layout.slots, z.size + 2))
    for slot in mine:
        if open_slots[slot]:
            rows[slot, : z.size] = z
            rows[slot, z.size] = 1.0
            rows[slot, z.size + 1] = min(float(((z - centroids[slot]) ** 2).sum()), 4.0)
    return rows.ravel()


def input_bound(max_clusters: int, restarts: int) -> float:
    """L2 bound of any client input: per candidate ||z||^2 + 1 + (4)^2 <= 18 (|z| = 1,
    squared distances capped at 4, the diameter of the unit ball squared); the moments
    vector has squared norm 3.
    """
    return math.sqrt(18.0 * len(Layout.search(max_clusters, restarts).ks))


@dataclass(frozen=True)
class SlotStats:
    """The released sum of one ``sum`` phase, per slot."""

    counts: np.ndarray  # (slots,)
    sums: np.ndarray  # (slots, d)
    sse: np.ndarray  # (slots,)

    @classmethod
    def from_total(cls, total: np.ndarray, layout: Layout, dim: int) -> SlotStats:
        rows = np.asarray(total, dtype=np.float64).reshape(layout.slots, dim + 2)
        return cls(np.rint(rows[:, dim]), rows[:, :dim], np.maximum(rows[:, dim + 1], 0.0))


@dataclass(frozen=True)
class Population:
    """The summaries' mean and principal axes, from the ``moments`` sum.

    Random starts are drawn in the span of the top principal axes, scaled by their
    spread: in summary-dim 64 with a dozen clients, an isotropic start is nearly
    orthogonal to where the clients differ, and Lloyd's first assignment is a coin toss.
    """

    mean: np.ndarray  # (d,)
    axes: np.ndarray  # (d, d) principal axes as columns, largest variance first
    spreads: np.ndarray  # (d,) standard deviation along each axis

    @classmethod
    def from_total(cls, total: np.ndarray, dim: int) -> Population:
        total = np.asarray(total, dtype=np.float64)
        n = round(float(total[dim]))
        mean = total[:dim] / n
        second = total[dim + 1 :].reshape(dim, dim) / n
        cov = (second + second.T) / 2 - np.outer(mean, mean)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1]
        return cls(mean, vectors[:, order], np.sqrt(np.maximum(values[order], 0.0)))

    def draw(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """K random starts in the top max(1, k - 1) axes (k = 1: the mean)."""
        if k == 1:
            return self.mean[None].copy()
        m = min(k - 1, self.mean.size)
        coefficients = rng.standard_normal((k, m)) * self.spreads[:m]
        return self.mean + coefficients @ self.axes[:, :m].T


def initial_centroids(
    layout: Layout, population: Population, rng: np.random.Generator
) -> np.ndarray:
    """Public random starts of every candidate (``Population.draw``)."""
    return np.concatenate([population.draw(hi - lo, rng) for lo, hi in layout.bounds])


def lloyd_update(
    centroids: np.ndarray,
    stats: SlotStats,
    layout: Layout,
    population: Population,
    rng: np.random.Generator,
) -> np.ndarray:
    """Open slots move to their members' mean; closed or empty ones restart at random."""
    out = centroids.copy()
    for lo, hi in layout.bounds:
        fresh = population.draw(hi - lo, rng)
        for slot in range(lo, hi):
            count = stats.counts[slot]
            out[slot] = stats.sums[slot] / count if count > 0 else fresh[slot - lo]
    return out


def bic(counts: np.ndarray, sse: float, n: int, dim: int) -> float:
    """X-means score of a k-means partition (higher is better); needs n > k."""
    k = len(counts)
    variance = max(sse / (dim * (n - k)), 1e-12)
    counts = counts[counts > 0]
    loglik = float(
        (counts * np.log(counts / n)).sum()
        - n * dim / 2 * math.log(2 * math.pi * variance)
        - dim * (n - k) / 2
    )
    params = (k - 1) + k * dim + 1
    return loglik - params / 2 * math.log(n)


def candidate_scores(
    layout: Layout, counts: np.ndarray, sse: np.ndarray, n: int, dim: int, min_size: int
) -> dict[int, tuple[float, int]]:
    """Per k: (score, candidate index) of its best restart among those fully open.

    A candidate is eligible when every slot has at least ``min_size`` members (their
    sums were released) and k < n.
    """
    best: dict[int, tuple[float, int, float]] = {}
    for i, (lo, hi) in enumerate(layout.bounds):
        k = hi - lo
        if k >= n or (counts[lo:hi] < min_size).any():
            continue
        total = float(sse[lo:hi].sum())
        if k not in best or total < best[k][2]:
            best[k] = (bic(counts[lo:hi], total, n, dim), i, total)
    return {k: (score, i) for k, (score, i, _) in best.items()}
