"""A client's side of a round: sample, train the private prompt, account, evaluate.

This is where the noise mechanics and the accountant meet on the client. The local
noise multiplier is calibrated once from the run's targets, and every noisy step is
recorded in the local accountant with the sampling rate actually used.

Sampling: in per-sample mode minibatches are Poisson samples with rate q = B/|D_i| (the
sampling the accountant's amplification analysis assumes), and sums are divided by the
expected size B. With ``local-steps`` K > 1 the global gradient sent is the mean of the
K step gradients: one sample still moves it by at most C/B, and it is included in at
least one of the K batches with probability 1 - (1 - q)^K, the rate reported to the
server for the global channel.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from dpfpl_app import accounting
from dpfpl_app.backbone import FrozenClip
from dpfpl_app.config import DPMode, Method, RunConfig
from dpfpl_app.federated_data import ClientData
from dpfpl_app.privacy import make_generator
from dpfpl_app.prompt_learner import LearnerSettings, PromptLearner
from dpfpl_app.text_encoder import CoOpTextEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOutcome:
    """What a client may tell the server after a round (the private parts stay here)."""

    global_grad: Tensor  # (n_ctx, d); zeros for methods that share nothing
    loss: float
    num_examples: int
    sample_rate: float
    eps_local: float


def template_context(clip: FrozenClip, template: str) -> Tensor:
    """Token embeddings of the hand-written template words (the zero-shot 'prompt')."""
    ids = clip.tokenizer(template, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"zeroshot-template {template!r} has no tokens")
    table = clip.model.text_model.embeddings.token_embedding.weight
    return table[torch.tensor(ids, device=table.device)].detach().float().cpu()


@lru_cache(maxsize=64)
def local_noise_multiplier(cfg: RunConfig, sample_rate: float) -> float:
    """The local channel's noise multiplier for this client (0 when it adds no noise)."""
    if not cfg.dp_on or not cfg.method.has_local:
        return 0.0
    steps = cfg.num_server_rounds * cfg.local_steps
    if cfg.dp_mode is DPMode.PAPER:
        return accounting.paper_noise_multiplier(
            epsilon=cfg.epsilon_local, delta=cfg.delta, rounds=steps
        )
    return accounting.calibrate_noise_multiplier(
        target_epsilon=cfg.epsilon_local,
        delta=cfg.delta,
        sample_rate=sample_rate,
        steps=steps,
        kind=accounting.AccountantKind(cfg.accountant.value),
    )


class ClientTrainer:
    """One client's learner, data, local accountant and noise source."""

    def __init__(
        self,
        cfg: RunConfig,
        clip: FrozenClip,
        class_names: tuple[str, ...],
        data: ClientData,
        *,
        partition_id: int,
    ) -> None:
        if data.num_train == 0 and cfg.method is not Method.ZEROSHOT:
            raise ValueError(f"partition {partition_id} has no training images")
        self.cfg, self.data, self.partition_id = cfg, data, partition_id
        self.sample_rate = min(1.0, cfg.batch_size / max(1, data.num_train))
        self.noise_multiplier = local_noise_multiplier(cfg, self.sample_rate)
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
            local_noise_multiplier=self.noise_multiplier,
        )
        init = torch.Generator().manual_seed(_derived_seed(cfg.seed, "init", partition_id))
        self.learner = PromptLearner(
            encoder,
            clip.model.logit_scale.exp().cpu(),
            settings,
            generator=init,
            width=clip.text_width,
            template_context=template,
        )
        self.local_accountant = accounting.ChannelAccountant(
            kind=accounting.AccountantKind(cfg.accountant.value), delta=cfg.delta
        )
        self.rounds_done = 0

    # ----- one round ---------------------------------------------------------------
    def train_round(self, global_prompt: Tensor, server_round: int) -> RoundOutcome:
        cfg, data = self.cfg, self.data
        self._receive(global_prompt)
        if cfg.method is Method.ZEROSHOT:  # nothing to train: report the template's loss
            logits = self.learner.logits(data.train_features[0])
            loss = float(torch.nn.functional.cross_entropy(logits, data.train_labels))
            self.rounds_done += 1
            return RoundOutcome(torch.zeros_like(global_prompt), loss, 0, self.sample_rate, 0.0)
        self.learner.generator = self._round_generator(server_round)
        sampler = self._round_generator(server_round, purpose="sampling")
        grads, losses, drawn = [], [], 0
        for _ in range(cfg.local_steps):
            idx = self._draw(sampler)
            feats = self._views(idx, sampler)
            step = self.learner.train_step(
                feats, data.train_labels[idx], expected_batch=self._expected_batch()
            )
            if step.local_noise_std > 0 and cfg.dp_mode is DPMode.PER_SAMPLE:
                self.local_accountant.step(
                    noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
                )
            if step.global_grad is not None:
                grads.append(step.global_grad)
            losses.append(step.loss)
            drawn += step.batch_size
        self.rounds_done += 1
        shared = torch.stack(grads).mean(0) if grads else torch.zeros_like(global_prompt)
        rate = 1.0 - (1.0 - self.sample_rate) ** cfg.local_steps
        finite = [x for x in losses if x == x]
        return RoundOutcome(
            shared, sum(finite) / max(1, len(finite)), drawn, rate, self.eps_local()
        )

    def _expected_batch(self) -> float:
        """Per-sample sums are divided by B even when |D_i| < B (then q = 1): the server's
        noise assumes every client's sensitivity is at most C/B.
        """
        if self.cfg.dp_mode is DPMode.PER_SAMPLE and self.cfg.dp_on:
            return float(self.cfg.batch_size)
        return float(min(self.cfg.batch_size, self.data.num_train))

    def _draw(self, generator: torch.Generator) -> Tensor:
        n = self.data.num_train
        if self.cfg.dp_mode is DPMode.PER_SAMPLE and self.cfg.dp_on:
            return torch.nonzero(torch.rand(n, generator=generator) < self.sample_rate).flatten()
        return torch.randperm(n, generator=generator)[: min(self.cfg.batch_size, n)]

    def _views(self, idx: Tensor, generator: torch.Generator) -> Tensor:
        feats = self.data.train_features
        if feats.shape[0] == 1:
            return feats[0, idx]
        view = torch.randint(1, feats.shape[0], (idx.numel(),), generator=generator)
        return feats[view, idx]

    def _round_generator(self, server_round: int, purpose: str = "noise") -> torch.Generator:
        if self.cfg.reproducible_noise or purpose == "sampling" and not self.cfg.dp_on:
            return torch.Generator().manual_seed(
                _derived_seed(self.cfg.seed, purpose, self.partition_id, server_round)
            )
        return make_generator(None)

    # ----- privacy and evaluation ----------------------------------------------------
    def eps_local(self) -> float:
        """Epsilon of the local channel: 0 without one, infinite when it trains unnoised."""
        if not self.cfg.method.has_local:
            return 0.0  # nothing private is trained locally, nothing about it is released
        if not self.cfg.dp_on:
            return math.inf  # a local prompt trained on the data without any noise
        if self.cfg.dp_mode is DPMode.PAPER and self.noise_multiplier > 0:
            return self.cfg.epsilon_local  # nominal, not a formal guarantee
        return self.local_accountant.epsilon()

    def _receive(self, global_prompt: Tensor) -> None:
        """Take the broadcast global prompt; methods without one ignore it (a constant)."""
        if self.cfg.method.has_global:
            self.learner.set_global_prompt(global_prompt)

    @torch.no_grad()
    def evaluate(self, global_prompt: Tensor) -> dict[str, float]:
        self._receive(global_prompt)
        d = self.data
        local = self._accuracy(d.local_features, d.local_labels)
        neighbour = self._accuracy(d.neighbour_features, d.neighbour_labels)
        return {
            "local-acc": local,
            "neighbour-acc": neighbour,
            "local-examples": float(d.local_labels.numel()),
            "neighbour-examples": float(d.neighbour_labels.numel()),
        }

    def _accuracy(self, features: Tensor, labels: Tensor) -> float:
        if labels.numel() == 0:
            return float("nan")
        predictions = self.learner.logits(features).argmax(dim=1)
        return float((predictions == labels).float().mean())

    # ----- persistence (node-local only) ------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Private tensors and the JSON-able rest (accountant, rounds) for the node's disk."""
        meta = {
            "rounds_done": self.rounds_done,
            "local_accountant": self.local_accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "method": self.cfg.method.value,
        }
        return self.learner.private_state(), meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if meta.get("method") != self.cfg.method.value:
            raise ValueError(
                f"saved client state is for method {meta.get('method')!r}, this run uses "
                f"{self.cfg.method.value!r}: use another state-dir or run-name"
            )
        self.learner.load_private_state(tensors)
        self.local_accountant = accounting.ChannelAccountant.from_state_dict(
            meta["local_accountant"]
        )
        self.rounds_done = int(meta["rounds_done"])


def _derived_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
