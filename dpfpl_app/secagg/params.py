"""Parameters of a secure-aggregation round: chosen once, checked by every party.

``SecAggConfig`` is what an operator sets (the run config); ``RoundParams`` is what a
round derives from it and the sampled node ids, sent to every client in stage 0.
A client re-derives the parameters from its OWN config and refuses a server whose
parameters differ (``RoundParams.check_against``): otherwise a server could shrink the
noise or the threshold below what the client agreed to.

Rules, for n sampled nodes (each overridable):

* neighbour-graph degree k (SecAgg+, Bell et al. 2020): k = 2 ceil(log2 n) + 2 when
  that is below n - 1, else the complete graph k = n - 1 (the original SecAgg). Each
  client's cost then grows like log n. Bell et al. prove k = O(log n) suffices and give
  the constant as a function of the tolerated corruption and dropout fractions and the
  security parameter; ours is a plain choice in that regime (k = 16 at n = 100), not
  their derived value: compute theirs when a formal guarantee at given fractions is
  needed, and pass it as ``degree``. The "+2" keeps k even (``graph``'s Harary
  construction).
* share holders: a client's k neighbours and the client itself (Bonawitz et al. share
  with every client including the owner). The own share matters when few nodes take
  part: with n = 3 (k = 2), a survivor's seed is still recoverable after the third node
  dies, from its own share and the other survivor's. The owner reveals its own share
  only of its seed, and only when it is among the survivors it is answering for.
* Shamir threshold t = floor((k + 1) / 2) + 1: a strict majority of the k + 1 holders.
  The server can get at most one kind of share from each neighbour and only seed shares
  from the owner, so obtaining both the self-mask seed and the mask key of one client
  would need 2t - 1 <= k distinct neighbours: impossible. Up to k + 1 - t holders may
  drop, and up to t - 1 colluding neighbours learn nothing of a client's secrets.
* release threshold ``min_survivors`` = max(t, ceil(2 n / 3)): the smallest number of
  noised inputs a released sum may contain. Every client's noise is sized so that this
  many survivors reach the calibrated total (``dp.client_variance_for``); fewer
  survivors at any stage abort the round. It tolerates a third of the sampled clients
  dropping; raising it lowers each client's noise share (less excess noise when
  all survive) but tolerates fewer dropouts.
* fixed-point scale: 64 sqrt(dim) / clip by default, so that randomised rounding (at
  most sqrt(dim) in L2) inflates the sensitivity by at most 1/64.
* ring width: the smallest ``bits`` with |sum| < 2^(bits - 1) for n in-bound inputs
  plus the n-client noise tail at probability ``wrap_probability`` per round.
* sum check: an unmasked sum whose L2 norm exceeds ``sum_norm_bound(m)`` (m in-bound
  inputs plus the m survivors' noise, exceeded by an honest round with probability at
  most ``wrap_probability``) is refused: nothing is released.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import skellam
from .dp import DistributedSkellam, client_variance_for
from .stream import MAX_RING_BITS

ROUND_ID_BYTES = 16
CLIP_TOLERANCE = 1e-6  # relative slack for float32 clipping landing a hair above C
DEFAULT_SCALE_RATIO = 64.0


def default_degree(n: int) -> int:
    """Neighbour-graph degree k for n nodes (module docstring: the rule and why)."""
    k = 2 * math.ceil(math.log2(n)) + 2
    return n - 1 if k >= n - 1 else k


def default_threshold(degree: int) -> int:
    """Shamir threshold: a strict majority of a client's degree + 1 share holders."""
    return (degree + 1) // 2 + 1


def default_min_survivors(n: int, threshold: int) -> int:
    """Release threshold: at least t, and at least two thirds of the sampled nodes."""
    return min(n, max(threshold, math.ceil(2 * n / 3)))


@dataclass(frozen=True)
class SecAggConfig:
    """What the operator chooses; everything else of a round is derived from it.

    Parameters
    ----------
    dim : int
        Length of the vector summed.
    clip : float
        L2 bound of each client's input; larger inputs are refused, never wrapped.
    sum_noise_std : float
        Calibrated std per coordinate of the noise on the float SUM, reached by any
        ``min_survivors`` clients together; 0 disables distributed DP.
    l2_sensitivity : float | None
        Float L2 sensitivity for the accounting; ``clip`` (client-level) if None.
    scale, degree, threshold, min_survivors : optional
        Overrides of the rules in the module docstring.
    require_all : bool
        Every sampled node must survive (``min_survivors`` = n, whatever n is): for sums
        whose blocks are over subsets of the clients (SecFPP's clusters), where a dropout
        could leave a block with fewer inputs than the rule that opened it.
    wrap_probability : float
        Probability per round that the noise tail exceeds the ring (then the norm check
        aborts the round: a wrap is never released silently).

    """

    dim: int
    clip: float
    sum_noise_std: float = 0.0
    l2_sensitivity: float | None = None
    scale: float | None = None
    degree: int | None = None
    threshold: int | None = None
    min_survivors: int | None = None
    require_all: bool = False
    wrap_probability: float = 2.0**-40

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be finite and > 0, got {self.clip}")
        if not (self.sum_noise_std >= 0 and math.isfinite(self.sum_noise_std)):
            raise ValueError(f"sum_noise_std must be finite and >= 0, got {self.sum_noise_std}")
        if self.scale is not None and not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")
        if not 0 < self.wrap_probability < 1:
            raise ValueError(f"wrap_probability must be in (0, 1), got {self.wrap_probability}")

    @property
    def effective_scale(self) -> float:
        """The fixed-point scale used (the default rule unless ``scale`` is set)."""
        return self.scale or DEFAULT_SCALE_RATIO * math.sqrt(self.dim) / self.clip


@dataclass(frozen=True)
class RoundParams:
    """Everything public about one round; identical at the server and every client."""

    round_id: bytes
    nodes: tuple[int, ...]
    degree: int
    threshold: int
    min_survivors: int
    dim: int
    clip: float
    scale: float
    client_variance: float
    bits: int
    wrap_probability: float

    @classmethod
    def derive(cls, config: SecAggConfig, nodes: Sequence[int], round_id: bytes) -> RoundParams:
        """Apply the rules to ``nodes``; ValueError naming the setting that cannot hold."""
        ids = tuple(sorted(int(v) for v in nodes))
        n = len(ids)
        if len(set(ids)) != n:
            raise ValueError("node ids must be distinct")
        if n < 3:
            raise ValueError(
                "secure aggregation needs >= 3 nodes (a sum of 2 reveals each to the other),"
                f" got {n}"
            )
        if len(round_id) != ROUND_ID_BYTES:
            raise ValueError(f"round_id must have {ROUND_ID_BYTES} bytes")
        degree = config.degree if config.degree is not None else default_degree(n)
        if not 2 <= degree <= n - 1 or (degree % 2 and degree != n - 1):
            raise ValueError(
                f"degree must be even in [2, {n - 1}] or exactly {n - 1}, got {degree}"
            )
        threshold = config.threshold if config.threshold is not None else default_threshold(degree)
        if not 2 <= threshold <= degree + 1:
            raise ValueError(
                f"threshold must be in [2, degree + 1 = {degree + 1}] (the share holders: "
                f"the neighbours and the owner), got {threshold}"
            )
        if 2 * threshold - 1 <= degree:
            warnings.warn(
                f"threshold {threshold} is not a strict majority of {degree + 1} share holders:"
                " a server that lies about dropouts could obtain both masks of a client",
                stacklevel=2,
            )
        min_surv = (
            n
            if config.require_all
            else config.min_survivors
            if config.min_survivors is not None
            else default_min_survivors(n, threshold)
        )
        if not 2 <= min_surv <= n:
            raise ValueError(f"min_survivors must be in [2, {n}], got {min_surv}")
        scale = config.effective_scale
        variance = client_variance_for(config.sum_noise_std, scale, min_surv)
        return cls(
            round_id=bytes(round_id),
            nodes=ids,
            degree=degree,
            threshold=threshold,
            min_survivors=min_surv,
            dim=config.dim,
            clip=config.clip,
            scale=scale,
            client_variance=variance,
            bits=ring_bits(n, config.dim, config.clip, scale, variance, config.wrap_probability),
            wrap_probability=config.wrap_probability,
        )

    # --- bounds -------------------------------------------------------------------
    @property
    def coord_bound(self) -> int:
        """Largest |coordinate| of one client's quantised input."""
        return coord_bound(self.clip, self.scale)

    def sum_coord_bound(self, survivors: int) -> int:
        """Largest |coordinate| of a sum of ``survivors`` inputs plus their noise tail."""
        tail = skellam.tail_bound(
            survivors * self.client_variance, self.wrap_probability / self.dim
        )
        return survivors * self.coord_bound + tail

    def input_norm_bound(self, survivors: int) -> float:
        """Largest L2 norm of the sum of ``survivors`` in-bound quantised inputs.

        Triangle inequality: m (scale * clip + sqrt(dim)) (rounding adds at most
        sqrt(dim) per input).
        """
        return survivors * (self.scale * self.clip * (1 + CLIP_TOLERANCE) + math.sqrt(self.dim))

    def sum_norm_bound(self, survivors: int) -> float:
        """Largest L2 norm of an honest unmasked integer sum, but with ``wrap_probability``.

        Sum = X + N: X the m survivors' quantised inputs (||X|| <= A =
        ``input_norm_bound``), N their summed Skellam noise, Sk(m mu) per coordinate and
        independent of X. ||X + N||^2 = ||X||^2 + 2 <X, N> + ||N||^2 <= A^2 + 2 A r + Q:
        r bounds <u, N> for the unit vector u along X (its MGF is at most that of one
        Sk(m mu) coordinate, since cosh(l u_j) - 1 <= u_j^2 (cosh l - 1) for |u_j| <= 1:
        ``skellam.tail_bound`` at wrap_probability / 3), Q bounds ||N||^2
        (``skellam.norm_sq_bound`` at 2 wrap_probability / 3). Noise adds to a large
        input in quadrature, so this is far tighter than A + sqrt(dim) * tail (9dded1e's
        check): it refuses a sum whose inputs exceed A by a few clip norms, not only
        wraps and failed unmasking. It still cannot see a bad input inside the bound.
        """
        variance = survivors * self.client_variance
        inputs = self.input_norm_bound(survivors)
        r = skellam.tail_bound(variance, self.wrap_probability / 3)
        q = skellam.norm_sq_bound(variance, self.dim, 2 * self.wrap_probability / 3)
        return math.sqrt(inputs * inputs + 2 * inputs * r + q)

    def accounting(self, l2_sensitivity: float | None = None) -> DistributedSkellam:
        """The accounting view (``dp.DistributedSkellam``) of this round's mechanism."""
        return DistributedSkellam(
            scale=self.scale,
            dim=self.dim,
            client_variance=self.client_variance,
            l2_sensitivity=self.clip if l2_sensitivity is None else l2_sensitivity,
        )

    # --- wire form ----------------------------------------------------------------
    def to_payload(self) -> dict[str, Any]:
        """Plain types for a Flower ConfigRecord (uint64 node ids: Flower's serde handles them)."""
        return {
            "round-id": self.round_id,
            "nodes": list(self.nodes),
            "degree": self.degree,
            "threshold": self.threshold,
            "min-survivors": self.min_survivors,
            "dim": self.dim,
            "clip": self.clip,
            "scale": self.scale,
            "client-variance": self.client_variance,
            "bits": self.bits,
            "wrap-probability": self.wrap_probability,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RoundParams:
        """Inverse of ``to_payload``; KeyError/TypeError name a missing or bad field."""
        return cls(
            round_id=bytes(payload["round-id"]),
            nodes=tuple(int(v) for v in payload["nodes"]),
            degree=int(payload["degree"]),
            threshold=int(payload["threshold"]),
            min_survivors=int(payload["min-survivors"]),
            dim=int(payload["dim"]),
            clip=float(payload["clip"]),
            scale=float(payload["scale"]),
            client_variance=float(payload["client-variance"]),
            bits=int(payload["bits"]),
            wrap_probability=float(payload["wrap-probability"]),
        )

    def check_against(self, config: SecAggConfig) -> None:
        """Raise ValueError naming every field where the server's params differ from ours."""
        mine = RoundParams.derive(config, self.nodes, self.round_id)
        bad = [
            f"{name}: server {getattr(self, name)!r}, ours {getattr(mine, name)!r}"
            for name in ("degree", "threshold", "min_survivors", "dim", "clip", "bits")
            if getattr(self, name) != getattr(mine, name)
        ]
        for name in ("scale", "client_variance", "wrap_probability"):
            if not math.isclose(getattr(self, name), getattr(mine, name), rel_tol=1e-12):
                bad.append(f"{name}: server {getattr(self, name)!r}, ours {getattr(mine, name)!r}")
        if bad:
            raise ValueError("round parameters differ from this node's config: " + "; ".join(bad))


def coord_bound(clip: float, scale: float) -> int:
    """|coordinate| of a rounded input of L2 norm <= clip (1 + tolerance): floor + 1."""
    return math.floor(scale * clip * (1 + CLIP_TOLERANCE)) + 1


def ring_bits(
    n: int, dim: int, clip: float, scale: float, client_variance: float, wrap_probability: float
) -> int:
    """Ring width for n clients: the signed sum must stay inside (-2^(bits-1), 2^(bits-1)).

    |sum_j| <= n * coord_bound + tau, with tau the tail of Sk(n mu_c) at probability
    wrap_probability / dim per coordinate (union bound over coordinates).
    """
    tau = skellam.tail_bound(n * client_variance, wrap_probability / dim)
    bound = n * coord_bound(clip, scale) + tau
    bits = (bound).bit_length() + 1  # 2^(bits-1) > bound
    if bits > MAX_RING_BITS:
        raise ValueError(
            f"the sum needs a {bits}-bit ring (> {MAX_RING_BITS}):"
            " lower scale or noise, or sample fewer nodes"
        )
    return bits
