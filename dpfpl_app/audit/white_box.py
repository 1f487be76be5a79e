"""The white-box audit: many trials of one release, with and without the canary.

The adversary knows everything but the noise: the mechanism, the background inputs,
the carriers, the canary. For a Gaussian mechanism the most powerful test of "canary
or not" projects the release on the canary's direction (Neyman-Pearson: the
likelihood ratio is monotone in that projection), so the bound this audit reaches is
the best any adversary could, up to the number of trials. When the noise comes from a
public seed, the adversary also knows the noise: it replays the mechanism on the
canary-free input with the same seed and projects the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dpfpl_app.audit.bounds import ManyTrialBound, many_trial_lower_bound
from dpfpl_app.audit.mechanism import CanaryGame
from dpfpl_app.privacy.noise import NoiseSource

# (release, trial index) -> score; higher means "the canary was in".
Adversary = Callable[[Tensor, int], float]
# trial index -> the noise source that trial's release draws from
NoiseFor = Callable[[int], NoiseSource]


def secure_noise() -> NoiseFor:
    """One OS-keyed stream for all trials: what production uses, unknown to the adversary."""
    source = NoiseSource.secure()
    return lambda _trial: source


def public_seed_noise(seed: int) -> NoiseFor:
    """Per-trial streams from a public seed, as ``reproducible-noise = true`` makes them."""
    return lambda trial: NoiseSource.public_seed(seed, "audit", trial)


def projection_adversary(game: CanaryGame) -> Adversary:
    """Score = the release projected on the canary's direction."""
    direction = game.direction
    return lambda release, _trial: float(release @ direction)


def replay_adversary(game: CanaryGame, noise_for: NoiseFor) -> Adversary:
    """Score = projection of (release - the canary-free release with the same noise).

    Stands for an adversary who knows how the noise is seeded: with the seed public,
    the noise cancels and what is left is the canary's exact contribution, or zero.
    """
    direction = game.direction

    def score(release: Tensor, trial: int) -> float:
        replay = game.release(False, noise_for(trial))
        return float((release - replay) @ direction)

    return score


def run_trials(
    game: CanaryGame, *, trials: int, noise_for: NoiseFor, adversary: Adversary
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ``trials`` releases with the canary and ``trials`` without.

    Trials alternate (with, without) so that both see the same stretch of any noise
    stream; trial indices are distinct, so per-trial streams never repeat.
    """
    if trials < 2:
        raise ValueError(f"trials must be >= 2, got {trials}")
    scores = np.empty((trials, 2))
    with torch.no_grad():
        for i in range(trials):
            for col, include in enumerate((True, False)):
                index = 2 * i + col
                scores[i, col] = adversary(game.release(include, noise_for(index)), index)
    return scores[:, 0], scores[:, 1]


@dataclass(frozen=True)
class WhiteBoxAudit:
    """One white-box audit: the claim, the bound against it, and what the bound saw."""

    game: CanaryGame
    claimed_epsilon: float
    exact_epsilon: float
    adversary: str
    bound: ManyTrialBound
    scores_with: np.ndarray
    scores_without: np.ndarray

    @property
    def violation(self) -> bool:
        """True when the lower bound exceeds the claim: the claim cannot hold."""
        return self.bound.epsilon > self.claimed_epsilon

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
    noise_for: NoiseFor | None = None,
    adversary: Adversary | None = None,
    adversary_name: str = "projection on the canary direction",
) -> WhiteBoxAudit:
    """Run the trials, bound epsilon from their scores and compare with the claim.

    ``noise_for`` defaults to secure noise and ``adversary`` to the projection; tests
    and ``--public-noise-seed`` pass a public-seed source and the replay adversary.
    """
    noise_for = noise_for or secure_noise()
    adversary = adversary or projection_adversary(game)
    with_, without = run_trials(game, trials=trials, noise_for=noise_for, adversary=adversary)
    bound = many_trial_lower_bound(with_, without, delta=delta, confidence=confidence)
    return WhiteBoxAudit(
        game=game,
        claimed_epsilon=claimed_epsilon,
        exact_epsilon=exact_epsilon,
        adversary=adversary_name,
        bound=bound,
        scores_with=with_,
        scores_without=without,
    )
