"""Epsilon of Poisson-subsampled Gaussian steps, and noise calibration, on opacus.

The noise mechanics (``privacy.py``, ``noise.py``) never import this module; the channel
plan (``dp_channel.py``) connects them: it calibrates the composed multiplier here from
the run's public settings and converts the steps actually taken into the epsilon we
print.

Notation: a *noise multiplier* z is the noise standard deviation divided by the L2
sensitivity of the released sum or mean (``dp_channel.py`` writes every sensitivity).
"""

from __future__ import annotations

import math
import warnings
from enum import Enum

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from dpfpl_app.privacy.calibration import (
    MAX_NOISE_MULTIPLIER,
    PrivacyBudgetError,
    smallest_multiplier,
)

# opacus's default RDP orders stop at 63; small epsilons with large noise multipliers
# have their optimal order far above that, and the conversion then reports a loose
# (or no) bound. Extending the grid only tightens the bound, it never weakens it.
# Orders above 1024 changed no calibration down to epsilon 0.01 at the paper's settings
# and cost O(order) each in opacus, so the grid stops there.
RDP_ORDERS: list[float] = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + [64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024]
)


class AccountantKind(str, Enum):
    """Which opacus accountant converts the noisy steps into an (epsilon, delta) bound."""

    RDP = "rdp"
    PRV = "prv"


def _new_accountant(kind: AccountantKind) -> IAccountant:
    return RDPAccountant() if kind is AccountantKind.RDP else PRVAccountant()


def _epsilon_of(accountant: IAccountant, kind: AccountantKind, delta: float) -> float:
    if not accountant.history:
        return 0.0
    with warnings.catch_warnings():
        # The RDP orders are extended above (and PRV only uses RDP to bound its grid);
        # an optimum at the largest order means the bound could be a little tighter
        # still, never that it is wrong.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if kind is AccountantKind.RDP:
            return float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))
        return float(accountant.get_epsilon(delta=delta))


def epsilon_for(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    kind: AccountantKind = AccountantKind.RDP,
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian releases."""
    _check_rate_delta(sample_rate, delta)
    accountant = _new_accountant(kind)
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return _epsilon_of(accountant, kind, delta)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: AccountantKind = AccountantKind.RDP,
    relative_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to a tolerance) whose epsilon does not exceed the target.

    The bisection (``calibration.smallest_multiplier``) never overshoots the target.
    """
    if steps <= 0:
        raise PrivacyBudgetError(f"steps must be a positive integer, got {steps}")
    _check_rate_delta(sample_rate, delta)

    def eps(z: float) -> float:
        return epsilon_for(
            noise_multiplier=z, sample_rate=sample_rate, steps=steps, delta=delta, kind=kind
        )

    return smallest_multiplier(
        eps,
        target_epsilon,
        relative_tolerance=relative_tolerance,
        unreachable=(
            f"epsilon={target_epsilon} at delta={delta} cannot be reached in {steps} steps "
            f"at sample rate {sample_rate:.4g} with a noise multiplier below "
            f"{MAX_NOISE_MULTIPLIER:g}; raise the epsilon, lower the number of rounds or "
            "local steps, or lower the batch size"
        ),
    )


def paper_noise_multiplier(*, epsilon: float, delta: float, rounds: int) -> float:
    """The paper's advanced-composition formula ``sqrt(T ln(1/delta)) / epsilon``.

    Multiplied by the clip norm it is the paper's sigma. It comes with no formal
    sample-level guarantee here: the paper mode clips minibatch means, not samples.
    """
    if epsilon <= 0:
        raise PrivacyBudgetError(f"paper epsilon must be > 0, got {epsilon}")
    _check_rate_delta(1.0, delta)
    return math.sqrt(rounds * math.log(1.0 / delta)) / epsilon


def _check_rate_delta(sample_rate: float, delta: float) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyBudgetError(f"sample rate must be in (0, 1], got {sample_rate}")
    if not 0.0 < delta < 1.0:
        raise PrivacyBudgetError(f"delta must be in (0, 1), got {delta}")
