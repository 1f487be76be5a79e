"""Membership-inference attacks on a released prompt: how much does it leak.

Two attacks, both black-box on the prompt's predictions (what a public user of the
prompt sees):

* **threshold**: a sample the prompt was trained on tends to have a lower loss. The
  score is the negative cross-entropy of the true class; the ROC over all thresholds
  gives the AUC, and TPR at 1% FPR says whether a few members can be identified with
  confidence (Carlini et al., 2022, argue for that figure over average accuracy);
* **shadow** (Shokri et al., 2017; the paper's appendix): the attacker trains shadow
  prompts the same way on data of its own, labels their outputs member / non-member,
  and fits one small classifier per class on the prediction vector. The features are
  the log-softmax outputs: the softmax itself saturates near 1 for every confident
  sample, and the logarithm (a monotone map of the same outputs) keeps the differences.

Ground truth is the caller's job and is checked here: members must be samples the
target really trained on, non-members held-out samples of the same distribution, and
the two sets disjoint (the authors' code called never-trained samples "members").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neural_network import MLPClassifier
from torch import Tensor

LOW_FPR = 0.01


@dataclass(frozen=True)
class AttackResult:
    """How well an attack separates members from non-members (0.5 AUC = guessing)."""

    auc: float
    accuracy: float  # balanced accuracy at the best threshold (an optimistic upper figure)
    tpr_at_low_fpr: float  # TPR at FPR <= LOW_FPR
    members: int
    non_members: int


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


def check_disjoint(members: np.ndarray, non_members: np.ndarray) -> None:
    """Refuse ground truth in which a sample is both a member and a non-member."""
    shared = np.intersect1d(members, non_members)
    if shared.size:
        raise ValueError(
            f"{shared.size} sample(s) are both members and non-members (e.g. {shared[:5]}): "
            "non-members must be held out from the target's training data"
        )


def evaluate_scores(scores: np.ndarray, is_member: np.ndarray) -> AttackResult:
    """ROC summary of membership scores (higher = more likely a member)."""
    is_member = is_member.astype(bool)
    fpr, tpr, _ = roc_curve(is_member, scores)
    balanced = 0.5 * (tpr + 1.0 - fpr)
    return AttackResult(
        auc=float(roc_auc_score(is_member, scores)),
        accuracy=float(balanced.max()),
        tpr_at_low_fpr=float(tpr[fpr <= LOW_FPR].max()),
        members=int(is_member.sum()),
        non_members=int((~is_member).sum()),
    )


def loss_scores(logits: Tensor, labels: Tensor) -> np.ndarray:
    """Negative per-sample cross-entropy: the threshold attack's membership score."""
    return (-F.cross_entropy(logits.float(), labels, reduction="none")).numpy()


def threshold_attack(target: Outputs) -> AttackResult:
    return evaluate_scores(loss_scores(target.logits, target.labels), target.is_member.numpy())


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

    def scores(self, target: Outputs) -> np.ndarray:
        """Membership probability of each target sample, by its true class's model."""
        x, labels, _ = _stack([target])
        out = np.full(len(labels), self._fallback)
        for c, model in self._models.items():
            rows = labels == c
            if rows.any():
                out[rows] = model.predict_proba(x[rows])[:, 1]
        return out

    def attack(self, target: Outputs) -> AttackResult:
        return evaluate_scores(self.scores(target), target.is_member.numpy())


def _stack(outputs: list[Outputs]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = torch.cat([F.log_softmax(o.logits.float(), dim=1) for o in outputs]).numpy()
    labels = torch.cat([o.labels for o in outputs]).numpy()
    y = torch.cat([o.is_member for o in outputs]).numpy().astype(int)
    return x, labels, y
