"""Membership-inference attacks on a released prompt, and the statistics that judge them.

Two attacks, both black-box on the prompt's predictions (what a public user of the
prompt sees):

* **threshold**: a sample the prompt was trained on tends to have a lower loss. The
  score is the negative cross-entropy of the true class; the ROC over all thresholds
  gives the AUC, and TPR at a low FPR says whether a few members can be identified with
  confidence (Carlini et al., 2022, argue for that figure over average accuracy);
* **shadow** (Shokri et al., 2017; the paper's appendix): the attacker trains shadow
  prompts the same way on data of its own, labels their outputs member / non-member,
  and fits one small classifier per class on the prediction vector. The features are
  the log-softmax outputs: the softmax itself saturates near 1 for every confident
  sample, and the logarithm (a monotone map of the same outputs) keeps the differences.
  Its decision rule (membership probability > 0.5) is fixed on the shadows alone; the
  target's labels only score it.

Statistics over several independent targets (seeds): scores are pooled (members and
non-members of every target together), and a 95% interval comes from a two-stage
bootstrap that resamples targets, then members and non-members within each target, so
that it carries the seed-to-seed spread as well as the sampling of images. A TPR at FPR
alpha is refused unless the non-members allow at least ``MIN_FALSE_POSITIVES`` false
positives at that rate: with fewer, the threshold is set by the few most member-like
non-members (with none, it is "TPR at zero false positives", whatever alpha says).

Ground truth is the caller's job and is checked here: members must be samples the
target really trained on, non-members held-out samples of the same distribution, and
the two sets disjoint (the authors' code called never-trained samples "members").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.neural_network import MLPClassifier
from torch import Tensor

MIN_FALSE_POSITIVES = 10  # a TPR at FPR alpha needs alpha * non-members >= this
SHADOW_RULE = 0.5  # the shadow classifiers' own decision: member iff probability > 0.5

Statistic = Callable[[np.ndarray, np.ndarray], float]  # (scores, is_member) -> figure


@dataclass(frozen=True)
class Outputs:
    """A prompt's logits on labelled samples, and whether each sample was trained on."""

    logits: Tensor  # (n, C)
    labels: Tensor  # (n,)
    is_member: Tensor  # (n,) bool

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.logits.shape[0] != n or self.is_member.shape != (n,):
            raise ValueError(
                f"logits {tuple(self.logits.shape)}, labels {tuple(self.labels.shape)} and "
                f"is_member {tuple(self.is_member.shape)} must describe the same samples"
            )
        if not bool(self.is_member.any()) or bool(self.is_member.all()):
            raise ValueError("an attack needs both members and non-members")

    def subset(self, rows: np.ndarray) -> Outputs:
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        return Outputs(self.logits[rows_t], self.labels[rows_t], self.is_member[rows_t])


@dataclass(frozen=True)
class Scores:
    """One target's membership scores (higher = more likely a member) and ground truth."""

    scores: np.ndarray  # (n,)
    is_member: np.ndarray  # (n,) bool

    def __post_init__(self) -> None:
        if self.scores.shape != self.is_member.shape or self.scores.ndim != 1:
            raise ValueError(
                f"scores {self.scores.shape} and is_member {self.is_member.shape} must be "
                "one-dimensional and of the same length"
            )
        if self.is_member.dtype != bool:
            raise ValueError(f"is_member must be boolean, not {self.is_member.dtype}")
        if not self.is_member.any() or self.is_member.all():
            raise ValueError("an attack needs both members and non-members")

    @property
    def members(self) -> int:
        return int(self.is_member.sum())

    @property
    def non_members(self) -> int:
        return int((~self.is_member).sum())


def check_disjoint(members: np.ndarray, non_members: np.ndarray) -> None:
    """Refuse ground truth in which a sample is both a member and a non-member."""
    shared = np.intersect1d(members, non_members)
    if shared.size:
        raise ValueError(
            f"{shared.size} sample(s) are both members and non-members (e.g. {shared[:5]}): "
            "non-members must be held out from the target's training data"
        )


# --- figures of one set of scores ----------------------------------------------------
def auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    """ROC AUC: the chance that a random member outscores a random non-member (ties 1/2)."""
    ranks = rankdata(scores)  # average ranks: ties count one half (Mann-Whitney U)
    n_in = int(is_member.sum())
    n_out = len(scores) - n_in
    return float((ranks[is_member].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def min_non_members(fpr: float, min_false_positives: int = MIN_FALSE_POSITIVES) -> int:
    """Non-members needed to report a TPR at ``fpr`` (``fpr * n >= min_false_positives``)."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), not {fpr}")
    return math.ceil(min_false_positives / fpr - 1e-9)


def resolves(non_members: int, fpr: float, min_false_positives: int = MIN_FALSE_POSITIVES) -> bool:
    """Whether ``non_members`` resolve a TPR at ``fpr`` (see ``MIN_FALSE_POSITIVES``)."""
    return non_members >= min_non_members(fpr, min_false_positives)


def tpr_at_fpr(
    scores: np.ndarray,
    is_member: np.ndarray,
    fpr: float,
    *,
    min_false_positives: int = MIN_FALSE_POSITIVES,
) -> float:
    """Share of members above a threshold that lets at most ``fpr`` of non-members pass.

    The threshold is the (k+1)-th highest non-member score with ``k = floor(fpr n_out)``;
    a sample passes if it scores strictly above it, so the FPR achieved is <= ``fpr``.
    Refused (``ValueError``) when ``k < min_false_positives``.
    """
    out = np.sort(scores[~is_member])[::-1]
    if not resolves(len(out), fpr, min_false_positives):
        raise ValueError(
            f"TPR at FPR {fpr:g} needs at least {min_non_members(fpr, min_false_positives)} "
            f"non-members ({min_false_positives} false positives), not {len(out)}: "
            "report a larger FPR or pool more non-members"
        )
    threshold = out[math.floor(fpr * len(out) + 1e-9)]
    return float((scores[is_member] > threshold).mean())


def balanced_accuracy(decisions: np.ndarray, is_member: np.ndarray) -> float:
    """Mean of TPR and TNR of fixed member / non-member decisions (0.5 = guessing)."""
    decisions = decisions.astype(bool)
    return float(0.5 * (decisions[is_member].mean() + (~decisions[~is_member]).mean()))


# --- several targets: pooling and intervals ------------------------------------------
def pool(runs: Sequence[Scores]) -> Scores:
    """Every target's members and non-members in one set of scores."""
    if not runs:
        raise ValueError("pool needs at least one target's scores")
    return Scores(
        np.concatenate([r.scores for r in runs]), np.concatenate([r.is_member for r in runs])
    )


@dataclass(frozen=True)
class Estimate:
    """A figure on the pooled scores, with its two-stage bootstrap interval."""

    value: float
    low: float
    high: float


def pooled_estimates(
    runs: Sequence[Scores],
    statistics: Mapping[str, Statistic],
    *,
    reps: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Each statistic on the pooled scores, with a percentile interval at ``level``.

    One bootstrap replicate draws as many targets as there are, with replacement, and
    within each drawn target its members and its non-members, each with replacement
    (counts kept), then pools them. All statistics share the replicates.
    """
    if reps < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"reps must be >= 1 and level in (0, 1), not {reps}, {level}")
    pooled = pool(runs)
    rng = np.random.default_rng(seed)
    sides = [(np.flatnonzero(r.is_member), np.flatnonzero(~r.is_member)) for r in runs]
    draws: dict[str, list[float]] = {name: [] for name in statistics}
    for _ in range(reps):
        picked = []
        for t in rng.integers(0, len(runs), len(runs)):
            rows = np.concatenate([rng.choice(side, len(side)) for side in sides[t]])
            picked.append(Scores(runs[t].scores[rows], runs[t].is_member[rows]))
        resampled = pool(picked)
        for name, statistic in statistics.items():
            draws[name].append(statistic(resampled.scores, resampled.is_member))
    tails = [(1.0 - level) / 2, (1.0 + level) / 2]
    out = {}
    for name, statistic in statistics.items():
        low, high = np.quantile(draws[name], tails)
        out[name] = Estimate(statistic(pooled.scores, pooled.is_member), float(low), float(high))
    return out


# --- the attacks ---------------------------------------------------------------------
def loss_scores(logits: Tensor, labels: Tensor) -> np.ndarray:
    """Negative per-sample cross-entropy: the threshold attack's membership score."""
    return (-F.cross_entropy(logits.float(), labels, reduction="none")).numpy()


def threshold_scores(target: Outputs) -> Scores:
    return Scores(loss_scores(target.logits, target.labels), target.is_member.numpy())


class ShadowAttack:
    """One small MLP per class on log-softmax outputs, fitted on shadow prompts' outputs."""

    def __init__(self, *, hidden: int = 32, seed: int = 0) -> None:
        self.hidden, self.seed = hidden, seed
        self._models: dict[int, MLPClassifier] = {}
        self._fallback = 0.5

    def fit(self, shadows: list[Outputs]) -> ShadowAttack:
        x, labels, y = _stack(shadows)
        self._fallback = float(y.mean())
        for c in np.unique(labels):
            rows = labels == c
            if len(np.unique(y[rows])) < 2:
                continue  # a class with only members (or only non-members) teaches nothing
            model = MLPClassifier(
                hidden_layer_sizes=(self.hidden,), max_iter=1000, random_state=self.seed
            )
            self._models[int(c)] = model.fit(x[rows], y[rows])
        return self

    def probabilities(self, target: Outputs) -> np.ndarray:
        """Membership probability of each target sample, by its true class's model."""
        x, labels, _ = _stack([target])
        out = np.full(len(labels), self._fallback)
        for c, model in self._models.items():
            rows = labels == c
            if rows.any():
                out[rows] = model.predict_proba(x[rows])[:, 1]
        return out

    def scores(self, target: Outputs) -> Scores:
        return Scores(self.probabilities(target), target.is_member.numpy())

    def decisions(self, target: Outputs) -> Scores:
        """The shadow-fitted rule's verdicts (1.0 = member) as scores, with ground truth."""
        verdict = (self.probabilities(target) > SHADOW_RULE).astype(float)
        return Scores(verdict, target.is_member.numpy())


def _stack(outputs: list[Outputs]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = torch.cat([F.log_softmax(o.logits.float(), dim=1) for o in outputs]).numpy()
    labels = torch.cat([o.labels for o in outputs]).numpy()
    y = torch.cat([o.is_member for o in outputs]).numpy().astype(int)
    return x, labels, y
