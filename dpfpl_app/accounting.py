"""Privacy accounting for the two DP channels, on opacus accountants.

The noise mechanics (``privacy.py``) never import this module; the client and the
strategy connect the two: they calibrate a noise multiplier here before training and
record every noisy release here after it happens, so the epsilon we print is computed
from what was actually done (sampling rate, noise, number of steps), not from a plan.

Notation: a *noise multiplier* z is the noise standard deviation divided by the L2
sensitivity of the released sum or mean; the sensitivity argument for each channel is
written next to the code that adds the noise (``privacy.py`` for the local channel,
``strategy.py`` for the global one).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from enum import Enum
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

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

MAX_NOISE_MULTIPLIER = 1.0e4


class AccountantKind(str, Enum):
    """Which opacus accountant converts the noisy steps into an (epsilon, delta) bound."""

    RDP = "rdp"
    PRV = "prv"


class PrivacyBudgetError(ValueError):
    """A requested privacy target cannot be met with the given settings."""


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
    prior_history: Sequence[tuple[float, float, int]] = (),
) -> float:
    """Smallest noise multiplier (to a tolerance) whose epsilon does not exceed the target.

    ``prior_history`` holds releases already made, as ``(multiplier, rate, steps)``: the
    multiplier is then chosen for the remaining ``steps`` so the WHOLE history fits, which
    is what a recalibration mid-run needs (a history mixed from two rates can exceed the
    target even when each part alone fits it). Bisection keeps the invariant
    ``epsilon(high) <= target``, so the result never overshoots the budget; the tolerance
    is relative because targets span 0.01 to 10 and an absolute one would be coarse at
    the small end.
    """
    if target_epsilon <= 0:
        raise PrivacyBudgetError(
            f"target epsilon must be > 0, got {target_epsilon}; use dp-mode='off' for no DP"
        )
    if steps <= 0:
        raise PrivacyBudgetError(f"steps must be a positive integer, got {steps}")
    _check_rate_delta(sample_rate, delta)
    history = [(float(z), float(q), int(n)) for z, q, n in prior_history]

    def eps(z: float) -> float:
        accountant = _new_accountant(kind)
        accountant.history = [*history, (z, sample_rate, steps)]
        return _epsilon_of(accountant, kind, delta)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > MAX_NOISE_MULTIPLIER:
            taken = sum(n for *_, n in history)
            spent = f" after the {taken} steps already taken" if history else ""
            raise PrivacyBudgetError(
                f"epsilon={target_epsilon} at delta={delta} cannot be reached in {steps} steps "
                f"at sample rate {sample_rate:.4g}{spent} with a noise multiplier below "
                f"{MAX_NOISE_MULTIPLIER:g}; raise the epsilon, lower the number of rounds or "
                "local steps, or lower the batch size"
            )
    while high - low > relative_tolerance * high:
        mid = 0.5 * (low + high)
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def paper_noise_multiplier(*, epsilon: float, delta: float, rounds: int) -> float:
    """The paper's advanced-composition formula ``sqrt(T ln(1/delta)) / epsilon``.

    Multiplied by the clip norm it is the paper's sigma. It comes with no formal
    sample-level guarantee here: the paper mode clips minibatch means, not samples.
    """
    if epsilon <= 0:
        raise PrivacyBudgetError(f"paper epsilon must be > 0, got {epsilon}")
    _check_rate_delta(1.0, delta)
    return math.sqrt(rounds * math.log(1.0 / delta)) / epsilon


def composed_noise_multiplier(*multipliers: float) -> float:
    """Noise multiplier of several Gaussian releases computed on the same minibatch.

    Releasing Gaussian answers with multipliers z_1..z_k on one subsample is a single
    Gaussian mechanism with ``z = (sum z_i^-2)^-1/2`` (stack the answers, whiten each by
    its own sigma). This is how the local carriers and the global gradient, released in
    the same step from the same batch, compose into the epsilon of the released prompt.
    """
    if not multipliers or any(z <= 0 for z in multipliers):
        raise ValueError(f"noise multipliers must be positive, got {multipliers}")
    return 1.0 / math.sqrt(sum(z**-2 for z in multipliers))


def _check_rate_delta(sample_rate: float, delta: float) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyBudgetError(f"sample rate must be in (0, 1], got {sample_rate}")
    if not 0.0 < delta < 1.0:
        raise PrivacyBudgetError(f"delta must be in (0, 1), got {delta}")


class ChannelAccountant:
    """Epsilon spent so far by one noisy channel, from the releases actually made.

    Keeps opacus's compressed history of ``(noise_multiplier, sample_rate, steps)`` so it
    can be saved with a checkpoint (or a client's state) and restored exactly.
    """

    def __init__(self, *, kind: AccountantKind = AccountantKind.RDP, delta: float) -> None:
        _check_rate_delta(1.0, delta)
        self.kind = AccountantKind(kind)
        self.delta = delta
        self._accountant = _new_accountant(self.kind)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` noisy releases with the given multiplier and sampling rate."""
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        _check_rate_delta(sample_rate, self.delta)
        for _ in range(steps):
            self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._accountant.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent at this accountant's delta (0 before any release)."""
        return _epsilon_of(self._accountant, self.kind, self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "delta": self.delta,
            "history": [list(h) for h in self._accountant.history],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ChannelAccountant:
        accountant = cls(kind=AccountantKind(state["kind"]), delta=float(state["delta"]))
        accountant._accountant.history = [
            (float(z), float(q), int(n)) for z, q, n in state["history"]
        ]
        return accountant
