"""Accounting of the distributed Skellam mechanism: what one released sum costs.

Setting. Each of the m survivors adds Sk(mu_c) per coordinate to its fixed-point
input; the server learns the sum, whose noise is exactly Sk(m * mu_c) (``skellam``).
Neighbouring inputs change the integer sum by a vector of L2 norm <= Delta_2 and L1
norm <= Delta_1 (integer units, see ``quantised_sensitivity``).

Bound (Agarwal, Kairouz, Liu 2021, Skellam mechanism; integer orders a > 1, variance
mu of the total noise per coordinate):

    eps(a) <= a Delta_2^2 / (2 mu) + min( ((2a - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2),
                                            3 Delta_1 / (2 mu) )

The first term is the Gaussian mechanism's RDP at the same variance; the second is
the price of integer noise and vanishes as mu grows. Renyi divergence is
non-decreasing in the order, so a non-integer order (opacus uses 1.1, 1.2, ...) is
charged the bound at its ceiling: the curve returned here is valid at every order
opacus asks for and adds to an opacus RDP history order by order.

Rounds with more than the minimum number of survivors carry more noise: the caller
passes the ACTUAL count m, and the curve is computed at m * mu_c. A round that
released nothing (``SecAggAbort``) costs nothing and must not be accounted.

Amplification by subsampling is not in this curve: it is that of one release of the
sum. When the sensitivity is per sample and samples are Poisson-drawn (DP-FPL's global
channel), ``subsampled.poisson_subsampled_rdp`` amplifies it with a bound valid for any
mechanism (Zhu and Wang 2019; opacus's is Gaussian-only); ``dpfpl_app.privacy.secure_channel``
does so for the joint local-Gaussian + Skellam step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def skellam_rdp(
    orders: Sequence[float], *, l2_sensitivity: float, l1_sensitivity: float, variance: float
) -> np.ndarray:
    """RDP of the Skellam mechanism at ``orders`` (sensitivities and variance in integer units)."""
    if l2_sensitivity < 0 or l1_sensitivity < 0:
        raise ValueError("sensitivities must be >= 0")
    out = np.empty(len(orders))
    for i, order in enumerate(orders):
        if not order > 1:
            raise ValueError(f"RDP orders must be > 1, got {order}")
        if variance <= 0:
            out[i] = math.inf if l2_sensitivity > 0 else 0.0
            continue
        a = math.ceil(order)  # the bound holds at integer orders; D_a grows with a
        d2sq, d1, mu = l2_sensitivity**2, l1_sensitivity, variance
        out[i] = a * d2sq / (2 * mu) + min(
            ((2 * a - 1) * d2sq + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu)
        )
    return out


def quantised_sensitivity(l2_sensitivity: float, scale: float, dim: int) -> tuple[float, float]:
    """Integer-unit (Delta_2, Delta_1) of a float sensitivity after randomised rounding.

    Randomised rounding ``floor(scale * x + u)`` with the uniforms u shared between two
    neighbouring inputs moves each coordinate by at most ceil(scale |x_j - x'_j|), so
    the rounded difference has L2 norm <= scale * Delta + sqrt(dim); by joint convexity
    of exp((a-1) D_a), the mixture over u is no worse than the worst coupled pair. An
    integer vector has ||v||_1 <= min(sqrt(dim) ||v||_2, ||v||_2^2).
    """
    if l2_sensitivity < 0 or scale <= 0 or dim < 1:
        raise ValueError("need l2_sensitivity >= 0, scale > 0, dim >= 1")
    delta2 = scale * l2_sensitivity + math.sqrt(dim)
    return delta2, min(math.sqrt(dim) * delta2, delta2**2)


def rdp_to_epsilon(
    orders: Sequence[float], rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """(epsilon, best order) from an RDP curve (Balle et al. 2020, as opacus converts)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"{a.size} orders but {r.size} RDP values")
    eps = r - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return float(max(eps[best], 0.0)), float(a[best])


@dataclass(frozen=True)
class DistributedSkellam:
    """The accounting view of one secure-aggregation configuration.

    Parameters
    ----------
    scale : float
        Fixed-point scale (integer units per float unit).
    dim : int
        Length of the aggregated vector.
    client_variance : float
        Skellam variance each client adds per coordinate (integer units).
    l2_sensitivity : float
        Float-unit L2 sensitivity of the SUM to one neighbouring change: ``clip`` for
        client-level DP (one client's whole contribution), or the per-sample bound the
        caller's analysis proves (e.g. C / B for DP-FPL's global channel).

    """

    scale: float
    dim: int
    client_variance: float
    l2_sensitivity: float

    def total_variance(self, survivors: int) -> float:
        """Noise variance per coordinate in a sum of ``survivors`` contributions."""
        if survivors < 1:
            raise ValueError(f"a released sum has >= 1 contribution, got {survivors}")
        return survivors * self.client_variance

    def noise_std(self, survivors: int) -> float:
        """Noise std per coordinate of the de-quantised sum (float units)."""
        return math.sqrt(self.total_variance(survivors)) / self.scale

    def rdp(self, orders: Sequence[float], survivors: int) -> np.ndarray:
        """RDP curve of ONE released sum with ``survivors`` noised contributions in it."""
        d2, d1 = quantised_sensitivity(self.l2_sensitivity, self.scale, self.dim)
        return skellam_rdp(
            orders, l2_sensitivity=d2, l1_sensitivity=d1, variance=self.total_variance(survivors)
        )

    def epsilon(
        self, orders: Sequence[float], survivors: int, delta: float, rounds: int = 1
    ) -> float:
        """Epsilon of ``rounds`` such releases composed (no subsampling)."""
        return rdp_to_epsilon(orders, rounds * self.rdp(orders, survivors), delta)[0]


def client_variance_for(sum_noise_std: float, scale: float, min_survivors: int) -> float:
    """Per-client Skellam variance so that ANY ``min_survivors`` give ``sum_noise_std``.

    ``sum_noise_std`` is the calibrated std per coordinate of the noise on the float
    sum; m >= min_survivors clients give variance m * mu_c >= (scale * std)^2.
    """
    if sum_noise_std < 0 or scale <= 0 or min_survivors < 1:
        raise ValueError("need sum_noise_std >= 0, scale > 0, min_survivors >= 1")
    return (scale * sum_noise_std) ** 2 / min_survivors
