"""The white-box audit: many trials of one production release, with and without the canary.

The adversary knows everything but the noise: the mechanism, the background inputs,
the carriers, the canary. For a Gaussian mechanism the most powerful test of "canary
or not" projects the release on the canary's direction (Neyman-Pearson: the
likelihood ratio is monotone in that projection), so the bound this audit reaches is
the best any adversary could, up to the number of trials. When the noise comes from a
public seed, the adversary also knows the noise: it replays the mechanism on the
canary-free input with the same seed and projects the difference.

The same trials are measured against the claim (``measurements``): the noise std per
coordinate and the canary's shift, each at a fixed false-alarm probability. A release
whose noise or shift is off is a violation even when the epsilon bound cannot see it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dpfpl_app.audit.bounds import ManyTrialBound, many_trial_lower_bound
from dpfpl_app.audit.measurements import (
    FALSE_ALARM,
    NoiseCheck,
    ShiftCheck,
    noise_check,
    shift_check,
)
from dpfpl_app.audit.mechanism import CanaryGame

# (release, trial index) -> score; higher means "the canary was in".
Adversary = Callable[[Tensor, int], float]


def projection_adversary(game: CanaryGame) -> Adversary:
    """Score = the release projected on the canary's direction."""
    direction = game.direction
    return lambda release, _trial: float(release @ direction)


def replay_adversary(game: CanaryGame) -> Adversary:
    """Score = projection of (release - the canary-free release with the same noise).

    Stands for an adversary who knows how the noise is seeded (a game built with a
    public seed): the noise cancels and what is left is the canary's exact
    contribution, or zero.
    """
    direction = game.direction

    def score(release: Tensor, trial: int) -> float:
        return float((release - game.release(False, trial)) @ direction)

    return score


@dataclass(frozen=True)
class Trials:
    """What ``run_trials`` saw: every release (trials, d) and the adversary's scores."""

    releases_with: np.ndarray
    releases_without: np.ndarray
    scores_with: np.ndarray
    scores_without: np.ndarray


def run_trials(game: CanaryGame, *, trials: int, adversary: Adversary) -> Trials:
    """``trials`` releases with the canary and ``trials`` without, and their scores.

    Trials alternate (with, without); trial indices are distinct, so per-trial public
    streams never repeat.
    """
    if trials < 2:
        raise ValueError(f"trials must be >= 2, got {trials}")
    releases: list[list[np.ndarray]] = [[], []]
    scores = np.empty((trials, 2))
    with torch.no_grad():
        for i in range(trials):
            for col, include in enumerate((True, False)):
                index = 2 * i + col
                release = game.release(include, index)
                releases[col].append(release.numpy())
                scores[i, col] = adversary(release, index)
    return Trials(np.stack(releases[0]), np.stack(releases[1]), scores[:, 0], scores[:, 1])


@dataclass(frozen=True)
class WhiteBoxAudit:
    """One white-box audit: the claim, the bound against it, the measured noise and shift."""

    game: CanaryGame
    claimed_epsilon: float
    exact_epsilon: float
    adversary: str
    bound: ManyTrialBound
    noise: NoiseCheck
    shift: ShiftCheck
    scores_with: np.ndarray
    scores_without: np.ndarray

    @property
    def epsilon_violation(self) -> bool:
        """True when the lower bound exceeds the claim: the claim cannot hold."""
        return self.bound.epsilon > self.claimed_epsilon

    @property
    def violation(self) -> bool:
        """A bound above the claim, or noise or shift outside their intervals."""
        return self.epsilon_violation or not self.noise.ok or not self.shift.ok

    @property
    def tightness(self) -> float:
        """Lower bound / claim: how much of the claim the audit could confirm."""
        return (
            self.bound.epsilon / self.claimed_epsilon if self.claimed_epsilon > 0 else float("inf")
        )


def audit_white_box(
    game: CanaryGame,
    *,
    trials: int,
    claimed_epsilon: float,
    exact_epsilon: float,
    delta: float,
    confidence: float = 0.95,
    false_alarm: float = FALSE_ALARM,
    adversary: Adversary | None = None,
    adversary_name: str = "projection on the canary direction",
) -> WhiteBoxAudit:
    """Run the trials; bound epsilon from the scores; test the noise and the shift.

    ``adversary`` defaults to the projection; ``--public-noise-seed`` passes the replay.
    """
    adversary = adversary or projection_adversary(game)
    seen = run_trials(game, trials=trials, adversary=adversary)
    bound = many_trial_lower_bound(
        seen.scores_with, seen.scores_without, delta=delta, confidence=confidence
    )
    direction = game.direction.numpy()
    noise = noise_check(
        seen.releases_with,
        seen.releases_without,
        claimed_std=game.noise_std,
        extra_var=game.rounding_var,
        false_alarm=false_alarm,
    )
    shift = shift_check(
        seen.releases_with @ direction,
        seen.releases_without @ direction,
        claimed_shift=game.sensitivity,
        claimed_std=game.noise_std,
        extra_var=game.rounding_var,
        false_alarm=false_alarm,
    )
    return WhiteBoxAudit(
        game=game,
        claimed_epsilon=claimed_epsilon,
        exact_epsilon=exact_epsilon,
        adversary=adversary_name,
        bound=bound,
        noise=noise,
        shift=shift,
        scores_with=seen.scores_with,
        scores_without=seen.scores_without,
    )
