"""Noise calibration by bisection, for any accountant (torch-free).

Both channels' plans (opacus's Gaussian accountant in ``accounting``, the generic
subsampled bound of the secure channel in ``secure_channel``) search the smallest
noise multiplier that meets a target epsilon the same way; the search lives here once,
without imports that would make the secure aggregation's light stages load torch.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_NOISE_MULTIPLIER = 1.0e4


class PrivacyBudgetError(ValueError):
    """A requested privacy target cannot be met with the given settings."""


def smallest_multiplier(
    epsilon_of: Callable[[float], float],
    target_epsilon: float,
    *,
    unreachable: str,
    relative_tolerance: float = 0.01,
) -> float:
    """Smallest multiplier z (to a tolerance) with ``epsilon_of(z) <= target_epsilon``.

    Bisection keeps the invariant ``epsilon_of(high) <= target``, so the result never
    overshoots the budget; the tolerance is relative because targets span 0.01 to 10 and
    an absolute one would be coarse at the small end. ``unreachable`` is the error's
    explanation and fix when no multiplier below ``MAX_NOISE_MULTIPLIER`` suffices.
    """
    if target_epsilon <= 0:
        raise PrivacyBudgetError(
            f"target epsilon must be > 0, got {target_epsilon}; use dp-mode='off' for no DP"
        )
    low, high = 0.0, 1.0
    while epsilon_of(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(unreachable)
    while high - low > relative_tolerance * high:
        mid = 0.5 * (low + high)
        if epsilon_of(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
