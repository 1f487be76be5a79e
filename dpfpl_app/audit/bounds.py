"""From an attack's outcomes to a lower bound on epsilon that holds with stated confidence.

Both audits rest on the same fact: if a mechanism is (epsilon, delta)-DP, no test can
tell a neighbouring pair of inputs apart better than epsilon and delta allow. An attack
that does better, by more than chance explains, proves the mechanism is not
(epsilon, delta)-DP. Validity comes first: every function here errs towards a smaller
bound, never a larger one, so "lower bound > claimed epsilon" is evidence of a bug and
not of an unlucky sample.

* Many trials (white-box, ``many_trial_lower_bound``): scores from independent runs with
  and without one canary. The threshold is chosen on one half of the trials and the
  error rates are measured on the other half, so the search cannot inflate the bound;
  both rates get Clopper-Pearson upper bounds, each at half the error budget (union
  bound), so they hold together at the stated confidence.
* One run (``one_run_lower_bound``): Steinke, Nasr and Jagielski, "Privacy Auditing with
  One (1) Training Run", NeurIPS 2023. m canaries, each included by an independent fair
  coin; the auditor guesses the coin of r of them and abstains on the rest; v guesses are
  right. Under (epsilon, delta)-DP, P[at least v right] is at most
  ``P[Bin(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i`` with
  ``q = e^eps / (1 + e^eps)`` (their main theorem for delta > 0; with delta = 0 it is the
  tail of r flips of an epsilon-DP randomised response). The bound is the largest epsilon
  this bound still rejects at level 1 - confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

# Coarse step of the one-run epsilon search, then refined to the caller's resolution.
_COARSE_STEP = 1.0 / 16.0
# The threshold is chosen by the bound at a 100x stricter level on the selection half:
# that penalises thresholds far in the tail, whose few counts the selection half
# estimates badly, so the choice carries over to the evaluation half. (On Gaussian
# scores it halved the runs with a zero bound at 1000 trials and reached the expected-
# count ceiling at 1e5.) Any rule that looks only at the selection half is valid.
_SELECTION_ALPHA_FACTOR = 0.01


# --- many trials -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ManyTrialBound:
    """A many-trial audit's lower bound and the counts it rests on.

    The test is "canary present when score > threshold"; ``false_positives`` counts
    canary-free trials above the threshold, ``false_negatives`` canary trials at or
    below it, both on the evaluation trials only (not those that chose the threshold).
    """

    epsilon: float
    threshold: float
    false_positives: int
    false_negatives: int
    trials_with: int
    trials_without: int
    fpr_upper: float
    fnr_upper: float
    confidence: float
    delta: float


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound of a binomial proportion.

    The smallest p with ``P[Bin(trials, p) <= successes] <= alpha``: it covers the true
    proportion with probability at least ``1 - alpha`` whatever that proportion is
    (exact, never asymptotic, which is why we use it and not a normal approximation).
    """
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(_cp_upper(np.asarray(successes), trials, alpha))


def _cp_upper(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """``clopper_pearson_upper`` for an array of counts, unchecked (1 where all succeed)."""
    safe = np.minimum(successes, trials - 1)  # keeps the beta quantile defined; masked below
    return np.where(successes < trials, stats.beta.ppf(1.0 - alpha, safe + 1, trials - safe), 1.0)


def epsilon_from_error_rates(fpr: ArrayLike, fnr: ArrayLike, delta: float) -> np.ndarray:
    """The smallest epsilon that allows a test with these error rates (0 if any does).

    (epsilon, delta)-DP bounds both ``1 - FNR <= e^eps FPR + delta`` (the test's
    rejection region) and ``1 - FPR <= e^eps FNR + delta`` (its complement), so
    ``eps >= max(ln((1 - delta - FNR) / FPR), ln((1 - delta - FPR) / FNR))``. Rates of
    zero give infinity; the callers pass upper confidence bounds, which are never zero.
    """
    fpr_a, fnr_a = np.asarray(fpr, dtype=float), np.asarray(fnr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.clip(1.0 - delta - fnr_a, 0.0, None)) - np.log(fpr_a)
        two = np.log(np.clip(1.0 - delta - fpr_a, 0.0, None)) - np.log(fnr_a)
    best = np.fmax(one, two)  # fmax: a NaN (0/0) side is ignored, not propagated
    return np.maximum(np.nan_to_num(best, nan=0.0, posinf=np.inf), 0.0)


def _error_counts(
    scores_with: np.ndarray, scores_without: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """False positives and false negatives of "canary when score > t" for each t."""
    above_without = len(scores_without) - np.searchsorted(
        np.sort(scores_without), thresholds, side="right"
    )
    at_or_below_with = np.searchsorted(np.sort(scores_with), thresholds, side="right")
    return above_without, at_or_below_with


def _bounded_epsilon(
    false_pos: np.ndarray,
    false_neg: np.ndarray,
    n_with: int,
    n_without: int,
    alpha: float,
    delta: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epsilon from Clopper-Pearson upper bounds of both rates, each at level alpha / 2."""
    fpr_up = _cp_upper(false_pos, n_without, alpha / 2.0)
    fnr_up = _cp_upper(false_neg, n_with, alpha / 2.0)
    return epsilon_from_error_rates(fpr_up, fnr_up, delta), fpr_up, fnr_up


def many_trial_lower_bound(
    scores_with: ArrayLike,
    scores_without: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
    threshold: float | None = None,
    split_seed: int = 0,
) -> ManyTrialBound:
    """Epsilon lower bound from independent trials with and without the canary.

    Parameters
    ----------
    scores_with, scores_without : array-like
        The adversary's score in each trial; higher means "the canary was there".
    delta : float
        The delta of the claim under test.
    confidence : float
        Probability (over the trials) that the returned bound is below the true epsilon.
    threshold : float, optional
        A threshold fixed before seeing these scores: all trials are then used to
        measure error rates. Without it, a random half of each set picks the threshold
        that maximises the bound there (at a stricter level, see
        ``_SELECTION_ALPHA_FACTOR``), and the other half measures it.
    split_seed : int
        Seed of the permutation that splits the trials; it is independent of the
        scores, which is all the split's validity needs, so it can be public.

    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    with_ = np.asarray(scores_with, dtype=float).ravel()
    without = np.asarray(scores_without, dtype=float).ravel()
    minimum = 2 if threshold is None else 1
    if len(with_) < minimum or len(without) < minimum:
        raise ValueError(
            f"need at least {minimum} trials with and without the canary, "
            f"got {len(with_)} and {len(without)}"
        )
    if not (np.isfinite(with_).all() and np.isfinite(without).all()):
        raise ValueError("scores must be finite")
    alpha = 1.0 - confidence
    if threshold is None:
        rng = np.random.default_rng(split_seed)
        with_ = rng.permutation(with_)
        without = rng.permutation(without)
        pick_with, with_ = np.split(with_, [len(with_) // 2])
        pick_without, without = np.split(without, [len(without) // 2])
        candidates = np.concatenate(
            [[-np.inf], np.unique(np.concatenate([pick_with, pick_without]))]
        )
        fp, fn = _error_counts(pick_with, pick_without, candidates)
        eps, _, _ = _bounded_epsilon(
            fp, fn, len(pick_with), len(pick_without), alpha * _SELECTION_ALPHA_FACTOR, delta
        )
        threshold = float(candidates[int(np.argmax(eps))])
    fp, fn = _error_counts(with_, without, np.array([threshold]))
    eps, fpr_up, fnr_up = _bounded_epsilon(fp, fn, len(with_), len(without), alpha, delta)
    return ManyTrialBound(
        epsilon=float(eps[0]),
        threshold=threshold,
        false_positives=int(fp[0]),
        false_negatives=int(fn[0]),
        trials_with=len(with_),
        trials_without=len(without),
        fpr_upper=float(fpr_up[0]),
        fnr_upper=float(fnr_up[0]),
        confidence=confidence,
        delta=delta,
    )


# --- one run ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class OneRunBound:
    """A one-run audit's lower bound: m canaries, r guesses, v of them right."""

    epsilon: float
    canaries: int
    guesses: int
    correct: int
    confidence: float
    delta: float


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}"
        )


def one_run_p_value(
    *, canaries: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """Largest probability of >= ``correct`` right guesses under (epsilon, delta)-DP.

    The bound of the module docstring. The delta term spreads the 2 m delta of
    probability that (epsilon, delta)-DP leaves unaccounted over the ways of getting
    i more right guesses than randomised response would, and keeps the worst i.
    """
    _check_counts(canaries, guesses, correct)
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    if correct == 0:
        return 1.0
    q = float(special.expit(epsilon))  # accuracy of epsilon-DP randomised response
    tail = float(stats.binom.sf(correct - 1, guesses, q))  # P[Bin(r, q) >= v]
    if delta == 0.0:
        return min(tail, 1.0)
    # P[v - i <= Bin(r, q) <= v - 1] for i = 1..v, summed down from v - 1
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    windows = np.cumsum(below) / np.arange(1, correct + 1)
    return min(tail + 2.0 * canaries * delta * float(windows.max()), 1.0)


def one_run_lower_bound(
    *,
    canaries: int,
    guesses: int,
    correct: int,
    delta: float,
    confidence: float = 0.95,
    resolution: float = 1e-3,
) -> OneRunBound:
    """Largest epsilon (on a grid of step ``resolution``) that ``correct`` right guesses reject.

    Validity without assuming the p-value is monotone in epsilon: an (eps*, delta)-DP
    mechanism is (eps, delta)-DP for every eps >= eps*, so rejecting any grid point e
    (p-value < 1 - confidence) rejects every eps <= e as well. The bound is therefore
    the LARGEST grid point with p-value below the level, searched coarsely and then
    refined, and rounded down to the grid. The p-value bound is non-increasing in the
    number of right guesses v when 2 m delta <= 1 (from v to v + 1 the tail drops by
    P[Bin = v] and the delta term grows by at most 2 m delta P[Bin = v]), which is what
    makes "at least v right" a valid test; larger m delta is refused.
    """
    _check_counts(canaries, guesses, correct)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 <= delta <= 1.0 or 2.0 * canaries * delta > 1.0:
        raise ValueError(
            f"need 0 <= delta and 2 * canaries * delta <= 1, got delta={delta} with "
            f"{canaries} canaries; use fewer canaries or a smaller delta"
        )
    if not 0.0 < resolution <= _COARSE_STEP:
        raise ValueError(f"resolution must be in (0, {_COARSE_STEP}], got {resolution}")
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        p = one_run_p_value(
            canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta
        )
        return p < level

    def tail(eps: float) -> float:  # P[Bin(r, q) >= v]: increasing in eps, <= the p-value
        return float(stats.binom.sf(correct - 1, guesses, special.expit(eps)))

    best = 0.0
    if tail(0.0) < level:  # otherwise no epsilon is rejected at all
        # Above the first eps whose tail alone reaches the level nothing is rejected;
        # scanning down from there, the first rejected point is the largest one.
        top = 1.0
        while tail(top) < level:
            top *= 2.0
        coarse = np.arange(0.0, top + _COARSE_STEP, _COARSE_STEP)[::-1]
        base = next((float(e) for e in coarse if rejected(float(e))), None)
        if base is not None:
            steps = math.floor(_COARSE_STEP / resolution)
            fine = [base + k * resolution for k in range(steps, 0, -1)]
            best = next((e for e in fine if rejected(e)), base)
    return OneRunBound(
        epsilon=best,
        canaries=canaries,
        guesses=guesses,
        correct=correct,
        confidence=confidence,
        delta=delta,
    )


def one_run_guesses(
    scores: ArrayLike, included: ArrayLike, *, guess_in: int, guess_out: int
) -> tuple[int, int]:
    """Guess "in" for the ``guess_in`` top scores and "out" for the ``guess_out`` lowest.

    Returns ``(guesses, correct)``. The numbers of guesses must be fixed before the
    scores are seen (choosing them afterwards is a search the bound does not pay for).
    """
    s = np.asarray(scores, dtype=float).ravel()
    inc = np.asarray(included, dtype=bool).ravel()
    if s.shape != inc.shape:
        raise ValueError(f"one coin per score: {s.shape} scores, {inc.shape} coins")
    if guess_in < 0 or guess_out < 0 or guess_in + guess_out > len(s):
        raise ValueError(
            f"guess_in={guess_in} and guess_out={guess_out} must be >= 0 and sum to at most "
            f"the {len(s)} canaries"
        )
    order = np.argsort(s, kind="stable")
    right_out = int((~inc[order[:guess_out]]).sum())
    right_in = int(inc[order[len(s) - guess_in :]].sum())
    return guess_in + guess_out, right_in + right_out


def one_run_audit(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    guess_in: int,
    guess_out: int,
    delta: float,
    confidence: float = 0.95,
) -> OneRunBound:
    """The one-run bound from canary scores and their secret coins (``included``)."""
    guesses, correct = one_run_guesses(scores, included, guess_in=guess_in, guess_out=guess_out)
    return one_run_lower_bound(
        canaries=len(np.asarray(included).ravel()),
        guesses=guesses,
        correct=correct,
        delta=delta,
        confidence=confidence,
    )
