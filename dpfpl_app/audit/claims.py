"""What epsilon one noisy release is claimed to have, and what it exactly has.

The white-box audit attacks one release (one local step, one aggregation, one secure
sum) on fixed neighbouring inputs, with no subsampling: the claim under test is then the
accountant's epsilon for one step at sample rate 1, through the same code that prints
the epsilon of a run (the Gaussian accountant; for the secure sum, the Skellam curve of
``secure_channel`` at the round's survivors). The exact epsilon of that Gaussian
mechanism is the ceiling no sound audit can pass; reporting it separates "the audit is
loose" from "the claim is loose".
"""

from __future__ import annotations

import math

from scipy import optimize, stats

from dpfpl_app.privacy.accounting import AccountantKind, epsilon_for
from dpfpl_app.privacy.secure_channel import SecureSetting


def secure_claimed_epsilon(
    noise_multiplier: float, *, survivor_ratio: float, delta: float
) -> float:
    """The secure channel's epsilon for one released sum (Skellam, sample rate 1).

    ``survivor_ratio`` is m / t: the sum of m survivors carries m / t times the noise
    variance calibrated for the release threshold t.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    return SecureSetting(1.0, 0.0, noise_multiplier).epsilon([survivor_ratio], delta)


def claimed_epsilon(
    noise_multiplier: float, *, delta: float, kind: AccountantKind = AccountantKind.RDP
) -> float:
    """The accountant's epsilon for one Gaussian release without subsampling."""
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    return epsilon_for(
        noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1, delta=delta, kind=kind
    )


def gaussian_epsilon(noise_multiplier: float, *, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism with std / sensitivity = noise_multiplier.

    With mu = 1 / noise_multiplier the privacy curve of N(0, 1) against N(mu, 1) is
    ``delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)`` (Balle and Wang,
    ICML 2018, Theorem 8), decreasing in eps; we solve it for eps.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    mu = 1.0 / noise_multiplier

    def excess(eps: float) -> float:
        curve = stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(
            -mu / 2 - eps / mu
        )
        return float(curve) - delta

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2.0
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-10))


def release_claim(
    noise_multiplier: float,
    *,
    survivor_ratio: float | None,
    delta: float,
    kind: AccountantKind = AccountantKind.RDP,
) -> tuple[float, float]:
    """(claimed, exact) epsilon of one release: a Gaussian one, or a secure sum when
    ``survivor_ratio`` (m / t) is given, whose exact reference is the Gaussian at the
    same variance (Skellam noise of that variance is within a hair of it).
    """
    if survivor_ratio is None:
        return (
            claimed_epsilon(noise_multiplier, delta=delta, kind=kind),
            gaussian_epsilon(noise_multiplier, delta=delta),
        )
    return (
        secure_claimed_epsilon(noise_multiplier, survivor_ratio=survivor_ratio, delta=delta),
        gaussian_epsilon(noise_multiplier * math.sqrt(survivor_ratio), delta=delta),
    )
