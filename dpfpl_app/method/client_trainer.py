"""A client's side of a round: sample, train the private prompt, count, evaluate.

The noise sizes and the epsilon come from the run's channel plan (``dp_channel.py``),
which the server derives from the same public config, so nothing about this client's
data (its size, its sampling rate, its loss) has to be reported for the accounting.

Sampling: in per-sample mode minibatches are Poisson samples at the node's declared
rate q_i (fixed before its data is read, at most ``max-sample-rate``; ``dp_channel``)
drawn from a secret stream (amplification by subsampling needs the batch to be
unpredictable), and sums are divided by the public B, never by the drawn size. A
declared rate far from B/|D_i| costs utility or privacy but never breaks the accounting:
it is logged here, on the node only. With ``local-steps`` K > 1 the global gradient
sent is the mean of the K step gradients; ``dp_channel`` accounts it as K pieces.

Budget: a client never takes more than the ``T K`` steps its plan covers, and never
trains the same server round twice (a server resumed from an older checkpoint would
otherwise make it spend that round's budget again): both are refused with the fix.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.config import DPMode, Method, RunConfig
from dpfpl_app.data.federated_data import ClientData
from dpfpl_app.method import domain_clusters
from dpfpl_app.method.class_prior import prior_frontier
from dpfpl_app.method.gradients import class_logits
from dpfpl_app.method.prompt_learner import LearnerSettings, PromptLearner, ctx_init_words
from dpfpl_app.method.text_encoder import CoOpTextEncoder, template_context
from dpfpl_app.privacy.dp_channel import plan_for
from dpfpl_app.privacy.noise import NoiseSource
from dpfpl_app.privacy.sample_rate import rate_mismatch

logger = logging.getLogger(__name__)

SUMMARY_KEY = "secfpp.released-summary"  # private state: SecFPP's one noised summary


class BudgetError(ValueError):
    """Training this round would spend privacy budget the run does not have."""


@dataclass(frozen=True)
class RoundOutcome:
    """A round's results; only ``global_grad`` (and, without DP, ``loss``) may leave."""

    global_grad: Tensor  # (n_ctx, d); zeros for methods that share nothing
    loss: float  # node-local: an unnoised statistic of the batch
    epsilon: float  # composed epsilon of this client's releases so far


class CanaryRows(Protocol):
    """An audit's canaries (``audit/canaries.py`` builds them; the node decides, not us).

    ``draw`` returns the per-sample gradient rows (k, n_ctx, width) of the canaries in
    this step's batch, each drawn from ``sampler`` with ``sample_rate``: the rate the
    client samples its own data with, so a canary is an example like any other.
    """

    def draw(self, sampler: NoiseSource, sample_rate: float) -> Tensor: ...


class ClientTrainer:
    """One client's learner, data, budget counters and noise streams."""

    def __init__(
        self,
        cfg: RunConfig,
        clip: FrozenClip,
        class_names: tuple[str, ...],
        data: ClientData,
        *,
        partition_id: int,
        sample_rate: float | None = None,
        canaries: CanaryRows | None = None,
    ) -> None:
        if data.num_train == 0 and cfg.method is not Method.ZEROSHOT:
            raise ValueError(f"partition {partition_id} has no training images")
        self.cfg, self.data, self.partition_id = cfg, data, partition_id
        self.plan = plan_for(cfg)
        # the node's declared rate (None: the run's bound); refused above the bound
        self.sample_rate = self.plan.check_rate(
            self.plan.sample_rate if sample_rate is None else sample_rate
        )
        if self._poisson:
            mismatch = rate_mismatch(self.sample_rate, cfg.batch_size, data.num_train)
            if mismatch:
                logger.warning("partition %d: %s", partition_id, mismatch)
        template = (
            template_context(clip, cfg.zeroshot_template) if cfg.method is Method.ZEROSHOT else None
        )
        n_ctx = template.shape[0] if template is not None else cfg.n_ctx
        encoder = CoOpTextEncoder(clip.model, clip.tokenizer, class_names, n_ctx).to(clip.device)
        settings = LearnerSettings(
            method=cfg.method,
            n_ctx=n_ctx,
            rank=cfg.rank,
            init_std=cfg.init_std,
            lr=cfg.lr_local,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            dp_mode=cfg.dp_mode if cfg.dp_on else DPMode.OFF,
            clip_norm=cfg.clip_norm,
            local_noise_multiplier=self.plan.z_local,
        )
        init = init_generator(cfg.seed, partition_id)
        self.learner = PromptLearner(
            encoder,
            clip.model.logit_scale.exp().cpu(),
            settings,
            generator=init,
            width=clip.text_width,
            template_context=template,
            context_words=ctx_init_words(clip, cfg.ctx_init, n_ctx),
        )
        self._zeroshot = (clip, class_names)  # the reference classifier, built on evaluate
        self._template_text: Tensor | None = None
        self.rounds_done = 0  # rounds this client trained
        self.last_round = 0  # the last server round it trained
        self.steps_taken = 0  # local steps, each a release of the composed mechanism
        # called with the step count a round will reach, before it samples any data:
        # the node's privacy-budget ledger (``federation.node_budget``), which may refuse
        # (also called with (steps, 0) before SecFPP's summary release, ``domain_point``)
        self.before_round: Callable[..., None] | None = None
        self.released_summary: np.ndarray | None = None  # SecFPP: drawn once (``domain_point``)
        # an audit's canaries: only if this node's operator named a canary file
        self.canaries = canaries
        if self.canaries is not None and not self._poisson:
            raise ValueError(
                "audit canaries test the accounted mechanism: they need dp-mode per-sample "
                f"(this run has dp-mode {cfg.dp_mode.value}); remove this node's canary file "
                "(DPFPL_AUDIT_CANARIES) or change the dp-mode"
            )

    # ----- one round ---------------------------------------------------------------
    def train_round(self, global_prompt: Tensor, server_round: int) -> RoundOutcome:
        cfg, data = self.cfg, self.data
        self._check_budget(server_round)
        if self.before_round is not None:
            self.before_round(self.steps_taken + cfg.local_steps)
        self._receive(global_prompt)
        if cfg.method is Method.ZEROSHOT:  # nothing to train: report the template's loss
            logits = self.learner.logits(data.train_features[0])
            loss = float(torch.nn.functional.cross_entropy(logits, data.train_labels))
            self._count(server_round)
            return RoundOutcome(torch.zeros_like(global_prompt), loss, self.epsilon())
        # the power iteration's start is public randomness (only the noise must be secret)
        self.learner.generator = torch.Generator().manual_seed(
            _derived_seed(cfg.seed, "carriers", self.partition_id, server_round)
        )
        self.learner.noise = self._source(server_round, "local-noise")
        sampler = self._source(server_round, "batches", public=not cfg.dp_on)
        grads, losses = [], []
        for _ in range(cfg.local_steps):
            idx = self._draw(sampler)
            step = self.learner.train_step(
                self._views(idx, sampler),
                data.train_labels[idx],
                expected_batch=self._expected_batch(),
                canary_rows=(
                    self.canaries.draw(sampler, self.sample_rate) if self.canaries else None
                ),
            )
            if step.global_grad is not None:
                grads.append(step.global_grad)
            losses.append(step.loss)
        self._count(server_round)
        shared = torch.stack(grads).mean(0) if grads else torch.zeros_like(global_prompt)
        finite = [x for x in losses if x == x]
        return RoundOutcome(shared, sum(finite) / max(1, len(finite)), self.epsilon())

    def _check_budget(self, server_round: int) -> None:
        if server_round <= self.last_round:
            raise BudgetError(
                f"partition {self.partition_id} already trained round {self.last_round}, and "
                f"the server asks for round {server_round}: training it again would spend "
                "that privacy budget twice. The server was resumed from an older checkpoint: "
                f"resume from the latest one (round {self.last_round} or later)"
            )
        if self.steps_taken + self.cfg.local_steps > self.plan.planned_steps:
            raise BudgetError(
                f"partition {self.partition_id} has taken all {self.plan.planned_steps} steps "
                f"its privacy budget covers (num-server-rounds={self.cfg.num_server_rounds} x "
                f"local-steps={self.cfg.local_steps}); start a new run to train further"
            )

    def _count(self, server_round: int) -> None:
        self.rounds_done += 1
        self.last_round = server_round
        self.steps_taken += self.cfg.local_steps

    @property
    def _poisson(self) -> bool:
        """Poisson batches (and division by the expected size) in per-sample DP."""
        return self.cfg.dp_mode is DPMode.PER_SAMPLE and self.cfg.dp_on

    def _expected_batch(self) -> float:
        """Per-sample sums are divided by the public B whatever the declared rate: the
        noise of both channels assumes every client's sensitivity is at most C/B.
        """
        if self._poisson:
            return float(self.cfg.batch_size)
        return float(min(self.cfg.batch_size, self.data.num_train))

    def _draw(self, sampler: NoiseSource) -> Tensor:
        n = self.data.num_train
        if self._poisson:
            return torch.nonzero(sampler.bernoulli(n, self.sample_rate)).flatten()
        return torch.tensor(sampler.sample(range(n), min(self.cfg.batch_size, n)))

    def _views(self, idx: Tensor, sampler: NoiseSource) -> Tensor:
        feats = self.data.train_features
        if feats.shape[0] == 1:
            return feats[0, idx]
        view = 1 + (sampler.uniform(idx.numel()) * (feats.shape[0] - 1)).long()
        return feats[view, idx]

    def _source(self, server_round: int, purpose: str, *, public: bool = False) -> NoiseSource:
        """A round's stream: secret unless the run asks for reproducible (public) noise."""
        return NoiseSource.for_run(
            reproducible=public or self.cfg.reproducible_noise,
            seed=self.cfg.seed,
            purpose=(purpose, self.partition_id, server_round),
        )

    # ----- privacy and evaluation ----------------------------------------------------
    def epsilon(self) -> float:
        """Composed epsilon of everything this client released so far (its plan's meaning),
        at its own declared rate.
        """
        return self.plan.epsilon(self.steps_taken, self.sample_rate)

    def _receive(self, global_prompt: Tensor) -> None:
        """Take the broadcast global prompt; methods without one ignore it (a constant)."""
        if self.cfg.method.has_global:
            self.learner.set_global_prompt(global_prompt)

    def template_text(self) -> Tensor:
        """Class text features (C, e) of the zero-shot template: public, from the model."""
        if self._template_text is None:
            self._template_text = zeroshot_text(*self._zeroshot, self.cfg.zeroshot_template)
        return self._template_text

    def domain_point(self) -> np.ndarray:
        """SecFPP: the unit point of this client's noised domain summary.

        The summary is released once per run (``domain_clusters.release``, noise from a
        secret stream at the plan's ``z_summary``) and kept in the private state, so a
        later round or a restarted node reuses it, never redraws it: every clustering
        input and every cluster choice is post-processing of that one release, and a
        change to the training data after it changes neither.
        """
        if self.released_summary is None:
            cfg = self.cfg
            if self.before_round is not None:  # in the node's ledger before it is drawn
                self.before_round(self.steps_taken, 0)
            vectors = domain_clusters.image_vectors(
                self.data.train_features[0].double().numpy(),
                self.data.train_labels.numpy(),
                self.template_text().double().numpy(),
                cfg.summary_dim,
                cfg.seed,
            )
            size = cfg.batch_size / self.sample_rate  # public: the size the rate declares
            mean = domain_clusters.clipped_mean(vectors, clip=cfg.summary_clip, size=size)
            noise = self._source(0, "domain-summary").gaussian(
                (mean.size,), std=1.0, dtype=torch.float64
            )
            self.released_summary = domain_clusters.release(
                mean,
                noise.numpy(),
                clip=cfg.summary_clip,
                size=size,
                noise_multiplier=self.plan.z_summary,
            )
        return domain_clusters.point(self.released_summary)

    @torch.no_grad()
    def evaluate(self, global_prompt: Tensor) -> dict[str, float]:
        """Accuracies of the prompt, of the zero-shot template and of the class-prior
        frontier (``class_prior``: zero-shot with the best own-class bias), and the exact
        counts behind them (``<name>-correct``, ``*-examples``): a secure run sums them.
        """
        self._receive(global_prompt)
        d = self.data
        zeroshot = self.template_text()
        scale = self.learner.logit_scale

        def zeroshot_logits(features: Tensor) -> Tensor:
            return class_logits(zeroshot, features, scale)

        local, neighbour = d.local_features, d.neighbour_features
        hits = {
            "local": _hits(self.learner.logits, local, d.local_labels),
            "neighbour": _hits(self.learner.logits, neighbour, d.neighbour_labels),
            "zeroshot-local": _hits(zeroshot_logits, local, d.local_labels),
            "zeroshot-neighbour": _hits(zeroshot_logits, neighbour, d.neighbour_labels),
        }
        # the class-prior reference: zero-shot plus the best own-class bias (test data only)
        prior = prior_frontier(
            zeroshot_logits(local), d.local_labels,
            zeroshot_logits(neighbour), d.neighbour_labels, d.classes,
        )
        correct = {
            **{name: int(hit.sum()) for name, hit in hits.items()},
            "prior-local": prior.local_correct,
            "prior-neighbour": prior.neighbour_correct,
        }
        examples = {"local": d.local_labels.numel(), "neighbour": d.neighbour_labels.numel()}
        return {
            **{f"{name}-acc": _ratio(n, examples[name.rsplit("-", 1)[-1]])
               for name, n in correct.items()},
            **{f"{name}-correct": n for name, n in correct.items()},
            "local-examples": float(examples["local"]),
            "neighbour-examples": float(examples["neighbour"]),
        }

    # ----- persistence (node-local only) ------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Private tensors and the JSON-able rest (budget counters) for the node's disk."""
        meta = {
            "rounds_done": self.rounds_done,
            "last_round": self.last_round,
            "steps_taken": self.steps_taken,
            "method": self.cfg.method.value,
            "aggregation": self.plan.aggregation.value,
        }
        tensors = self.learner.private_state()
        if self.released_summary is not None:
            tensors[SUMMARY_KEY] = torch.from_numpy(self.released_summary.copy())
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if meta.get("method") != self.cfg.method.value:
            raise ValueError(
                f"saved client state is for method {meta.get('method')!r}, this run uses "
                f"{self.cfg.method.value!r}: use another state-dir or run-name"
            )
        if meta.get("aggregation", self.plan.aggregation.value) != self.plan.aggregation.value:
            raise ValueError(
                f"saved client state was trained with aggregation {meta['aggregation']!r}, "
                f"this message asks for {self.plan.aggregation.value!r}: one run's budget "
                "cannot mix the two accountings; use another run-name or state-dir"
            )
        missing = {"rounds_done", "last_round", "steps_taken"} - set(meta)
        if missing:
            raise ValueError(
                f"saved client state lacks {sorted(missing)} (written by an older dpfpl): "
                "its privacy budget cannot be continued; use another state-dir or run-name"
            )
        tensors = dict(tensors)
        released = tensors.pop(SUMMARY_KEY, None)
        if released is not None and released.shape != (self.cfg.summary_dim,):
            raise ValueError(
                f"saved domain summary has shape {tuple(released.shape)}, this run's "
                f"summary-dim is {self.cfg.summary_dim}: use another state-dir or run-name"
            )
        self.learner.load_private_state(tensors)
        self.released_summary = None if released is None else released.double().numpy()
        self.rounds_done = int(meta["rounds_done"])
        self.last_round = int(meta["last_round"])
        self.steps_taken = int(meta["steps_taken"])


@torch.no_grad()
def zeroshot_text(clip: FrozenClip, class_names: tuple[str, ...], template: str) -> Tensor:
    """Class text features (C, e) of the hand-written template: the zero-shot classifier."""
    words = template_context(clip, template)
    encoder = CoOpTextEncoder(clip.model, clip.tokenizer, class_names, words.shape[0])
    return encoder.to(clip.device)(words.to(clip.device)).cpu()


def _hits(logits: Callable[[Tensor], Tensor], features: Tensor, labels: Tensor) -> Tensor:
    """Which examples the logits classify correctly (bool, one per label)."""
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return logits(features).argmax(dim=1) == labels


def _ratio(correct: int, examples: int) -> float:
    return float("nan") if examples == 0 else correct / examples


def init_generator(seed: int, partition_id: int) -> torch.Generator:
    """The public generator of a client's initial prompts (an audit's adversary knows it)."""
    return torch.Generator().manual_seed(_derived_seed(seed, "init", partition_id))


def _derived_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
