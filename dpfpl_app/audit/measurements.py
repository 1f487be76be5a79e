"""Does the release carry the noise and the shift its claim says? Two-sided tests.

The epsilon lower bound (``bounds``) catches a release that leaks more than claimed, but
only when the leak is large enough for the trials to see; these two tests compare what
the production code produced with the numbers the claim rests on, at a false-alarm
probability fixed in advance (``FALSE_ALARM`` each, two-sided), whatever the machine:

* noise: with a fixed background, every release of one input is a constant plus the
  noise, so the sum of squared deviations from each coordinate's mean, over both inputs'
  trials, is sigma^2 times a chi-square with (T_with - 1 + T_without - 1) d degrees of
  freedom for Gaussian noise of std sigma per coordinate. The measured std must lie in
  the chi-square interval of the claimed std. Allowed extra variance (the secure
  channel's randomised rounding, at most ``extra_var``) widens the upper end only.
  Skellam noise of variance mu has excess kurtosis 1 / mu (above 1e4 at every
  configuration ``secure_channel`` builds), so the chi-square quantiles hold for it to
  well within the interval's width.
* shift: the mean projection on the canary's direction with the canary, minus without,
  is normal with mean the claimed sensitivity and variance sigma^2 (1/T_w + 1/T_wo),
  whatever the background. A missing clip (the canary is 100 C long), a wrong divisor
  or a wrong scale moves it out of the interval.

A deviation either way is reported: less noise or a larger shift breaks the privacy
claim; more noise or a smaller shift breaks the utility the plan promised, and says the
code does not run the mechanism that was accounted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

FALSE_ALARM = 1e-6  # probability that a correct release fails one test


@dataclass(frozen=True)
class NoiseCheck:
    """Measured noise std per coordinate against the claimed one."""

    claimed_std: float
    measured_std: float
    low: float  # the acceptance interval of the measured std
    high: float
    degrees_of_freedom: int
    false_alarm: float

    @property
    def ok(self) -> bool:
        return self.low <= self.measured_std <= self.high


@dataclass(frozen=True)
class ShiftCheck:
    """Measured shift of the release along the canary direction against the sensitivity."""

    claimed: float
    measured: float
    tolerance: float
    false_alarm: float

    @property
    def ok(self) -> bool:
        return abs(self.measured - self.claimed) <= self.tolerance


def _check_level(false_alarm: float) -> None:
    if not 0.0 < false_alarm < 1.0:
        raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm}")


def noise_check(
    releases_with: np.ndarray,
    releases_without: np.ndarray,
    *,
    claimed_std: float,
    extra_var: float = 0.0,
    false_alarm: float = FALSE_ALARM,
) -> NoiseCheck:
    """Chi-square test of the pooled per-coordinate std (module docstring).

    ``releases_*`` are (trials, d): each row one release of the same input.
    """
    _check_level(false_alarm)
    if claimed_std <= 0:
        raise ValueError(
            f"claimed_std must be > 0 (a noiseless release has nothing to test), got {claimed_std}"
        )
    squares, df = 0.0, 0
    for releases in (releases_with, releases_without):
        x = np.asarray(releases, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need (trials >= 2, d) releases, got shape {x.shape}")
        squares += float(((x - x.mean(axis=0)) ** 2).sum())
        df += (x.shape[0] - 1) * x.shape[1]
    low_q = stats.chi2.ppf(false_alarm / 2, df) / df
    high_q = stats.chi2.isf(false_alarm / 2, df) / df
    return NoiseCheck(
        claimed_std=claimed_std,
        measured_std=math.sqrt(squares / df),
        low=claimed_std * math.sqrt(low_q),
        high=math.sqrt((claimed_std**2 + extra_var) * high_q),
        degrees_of_freedom=df,
        false_alarm=false_alarm,
    )


def shift_check(
    projected_with: np.ndarray,
    projected_without: np.ndarray,
    *,
    claimed_shift: float,
    claimed_std: float,
    extra_var: float = 0.0,
    false_alarm: float = FALSE_ALARM,
) -> ShiftCheck:
    """Two-sided normal test of the mean shift along the canary direction."""
    _check_level(false_alarm)
    w = np.asarray(projected_with, dtype=np.float64)
    wo = np.asarray(projected_without, dtype=np.float64)
    spread = math.sqrt((claimed_std**2 + extra_var) * (1.0 / w.size + 1.0 / wo.size))
    return ShiftCheck(
        claimed=claimed_shift,
        measured=float(w.mean() - wo.mean()),
        tolerance=float(stats.norm.isf(false_alarm / 2)) * spread,
        false_alarm=false_alarm,
    )
