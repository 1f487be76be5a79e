"""One prompt learner; DP-FPL and every baseline are configurations of it.

The prompt a client predicts with is assembled from at most three parts:

====================  ==============================  =======================
method                prompt used                     trained locally
====================  ==============================  =======================
dpfpl                 p_G + u v + R  (= p_G + p_L)    p_L via carriers (Eq. 4)
dplora                p_G + u v                       p_L via carriers (Eq. 4)
fedpgp                p_G + u v                       u, v directly
fedotp                p_G + p_L                       p_L (full rank)
secfpp                p_D,c + p_L                     p_L (full rank)
promptfl              p_G                             nothing
local                 p_L                             p_L (full rank)
zeroshot              embedded template words         nothing
====================  ==============================  =======================

For secfpp the shared part is the domain prompt p_D,c of the client's secure cluster c
(``federation/cluster_strategy``): here it takes p_G's place, so SecFPP is FedOTP's
structure with one shared prompt per cluster instead of one for everyone.

The global prompt p_G is never updated here: its clipped gradient is returned for the
server. The private parts (p_L, u, v, R, optimiser state) stay in this object; the only
ways out are ``private_state`` (for the node's own disk) and
``personalised_prompt`` (explicit export).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.config import DPMode, Method
from dpfpl_app.method.gradients import class_logits, prompt_gradients
from dpfpl_app.method.text_encoder import CoOpTextEncoder, template_context
from dpfpl_app.privacy import mechanics
from dpfpl_app.privacy.dp_channel import local_noise_std
from dpfpl_app.privacy.noise import NoiseSource


@dataclass(frozen=True)
class LearnerSettings:
    """What the learner needs from the run config, plus the local noise multiplier.

    ``local_noise_multiplier`` is the channel plan's ``z_local`` (``dp_channel.py``).
    """

    method: Method
    n_ctx: int
    rank: int
    init_std: float
    lr: float
    momentum: float
    weight_decay: float
    dp_mode: DPMode
    clip_norm: float
    local_noise_multiplier: float = 0.0
    chunk_size: int = 16


@dataclass(frozen=True)
class StepResult:
    """What one local iteration produces for the outside world."""

    global_grad: Tensor | None  # clipped gradient of p_G (None when nothing is shared)
    loss: float  # mean loss of the minibatch before the update (nan if empty)
    batch_size: int  # samples actually drawn
    local_noise_std: float  # std of the noise added to the local channel (0 = none)


def initial_local_prompt(
    shape: tuple[int, int],
    init_std: float,
    generator: torch.Generator,
    words: Tensor | None = None,
) -> Tensor:
    """p_L at the start: the first draw of the learner's public generator (the server
    draws the initial p_G the same way from the run's seed).

    ``words`` (k, d), from :func:`ctx_init_words`, replace the first k rows (CoOp's
    ``ctx_init``); the draw is the same either way, so the remaining rows and every
    later draw of ``generator`` do not depend on whether words were given.
    """
    prompt = torch.randn(shape, generator=generator) * init_std
    if words is not None:
        prompt[: words.shape[0]] = words
    return prompt


def ctx_init_words(clip: FrozenClip, text: str, n_ctx: int) -> Tensor | None:
    """Token embeddings (k, d) of run-config ``ctx-init``; None when it is empty.

    The words go first, as CoOp's "a photo of a" then the class name: with n-ctx equal
    to their token count the untrained prompt is exactly the zero-shot sentence.
    """
    if not text:
        return None
    words = template_context(clip, text, key="ctx-init")
    if words.shape[0] > n_ctx:
        raise ValueError(
            f"ctx-init={text!r} is {words.shape[0]} tokens but n-ctx={n_ctx} context vectors "
            f"hold only {n_ctx}: raise n-ctx to at least {words.shape[0]} or shorten ctx-init"
        )
    return words


class PromptLearner:
    """Trains the private part of a client's prompt and differentiates the shared part."""

    def __init__(
        self,
        encoder: CoOpTextEncoder,
        logit_scale: Tensor,
        settings: LearnerSettings,
        *,
        generator: torch.Generator,
        width: int,
        template_context: Tensor | None = None,
        context_words: Tensor | None = None,
        noise: NoiseSource | None = None,
    ) -> None:
        """``generator`` draws the initial prompts and the power iteration's start (public
        randomness); ``noise`` draws the DP noise (a secret stream unless given).
        ``context_words`` (``ctx_init_words``) start the prompt of method ``local``; the
        methods with a global prompt get them from the server's initial p_G instead.
        """
        s = settings
        if s.method.low_rank and not 1 <= s.rank <= min(s.n_ctx, width):
            raise ValueError(
                f"rank={s.rank} must be in [1, min(n-ctx={s.n_ctx}, embedding width={width})]"
            )
        if s.method is Method.ZEROSHOT and template_context is None:
            raise ValueError("method 'zeroshot' needs the embedded template words")
        self.encoder = encoder
        self.logit_scale = logit_scale.detach().float()
        self.settings = s
        self.generator = generator
        self.noise = noise or NoiseSource.secure()
        shape = (s.n_ctx, width)
        self.global_prompt = torch.zeros(shape)
        self._template = template_context
        self._state: dict[str, Tensor] = {}
        if s.method in {Method.DPFPL, Method.DPLORA, Method.FEDOTP, Method.SECFPP, Method.LOCAL}:
            words = context_words if s.method is Method.LOCAL else None
            self._state["local_prompt"] = initial_local_prompt(
                shape, s.init_std, generator, words
            )
        if s.method is Method.FEDPGP:
            start = torch.randn(s.n_ctx, s.rank, generator=generator)
            self._state["u"] = mechanics.orthonormal_columns(start)
            self._state["v"] = torch.randn(s.rank, width, generator=generator) * s.init_std
        if s.method is Method.DPLORA:
            self._state["u"], self._state["v"], _ = mechanics.factorise(
                self._state["local_prompt"], s.rank, generator
            )
        self._momentum: dict[str, Tensor] = {}

    # ----- the prompt -------------------------------------------------------------
    def set_global_prompt(self, prompt: Tensor) -> None:
        if prompt.shape != self.global_prompt.shape:
            raise ValueError(
                f"global prompt has shape {tuple(prompt.shape)}, expected "
                f"{tuple(self.global_prompt.shape)} (n-ctx x text width): server and client "
                "must use the same n-ctx and backbone"
            )
        self.global_prompt = prompt.detach().float().clone()

    def personalised_prompt(self) -> Tensor:
        """The prompt this client predicts with (explicit export of private state)."""
        m, st = self.settings.method, self._state
        if m is Method.ZEROSHOT:
            return self._template.clone()  # type: ignore[union-attr]
        if m is Method.PROMPTFL:
            return self.global_prompt.clone()
        if m is Method.LOCAL:
            return st["local_prompt"].clone()
        if m in {Method.DPLORA, Method.FEDPGP}:
            return self.global_prompt + st["u"] @ st["v"]
        return self.global_prompt + st["local_prompt"]  # dpfpl (u v + R = p_L), fedotp, secfpp

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """Logits (N, C) over all classes with the personalised prompt."""
        text = self.encoder(self.personalised_prompt())
        return class_logits(text, features, self.logit_scale)

    # ----- training ---------------------------------------------------------------
    def train_step(
        self,
        features: Tensor,
        labels: Tensor,
        *,
        expected_batch: float,
        canary_rows: Tensor | None = None,
    ) -> StepResult:
        """One local iteration (Algorithm 1, steps 2-6) on the given minibatch.

        ``expected_batch`` is the B that per-sample sums are divided by; with Poisson
        sampling it is q |D|, not the drawn size, so that one sample's influence is C/B.
        ``canary_rows`` (k, n_ctx, width) are per-sample gradients of audit canaries in
        this batch (``audit/canaries.py``): clipped and summed like the real samples'.
        """
        s = self.settings
        if s.method is Method.ZEROSHOT:
            raise ValueError("method 'zeroshot' trains nothing; evaluate it directly")
        if canary_rows is not None and s.dp_mode is not DPMode.PER_SAMPLE:
            raise ValueError("audit canaries are per-sample gradients: use dp-mode per-sample")
        carriers = self._carriers()
        prompt = self._compose(carriers)
        per_sample = s.dp_mode is DPMode.PER_SAMPLE
        if labels.numel() == 0:  # an empty Poisson draw: no sample, only noise
            empty = (0, *prompt.shape) if per_sample else tuple(prompt.shape)
            grads, loss = torch.zeros(empty), float("nan")
        else:
            grads, losses = prompt_gradients(
                self.encoder,
                prompt,
                features,
                labels,
                self.logit_scale,
                per_sample=per_sample,
                chunk_size=s.chunk_size,
            )
            loss = float(losses.mean())
        if canary_rows is not None:
            grads = torch.cat([grads, canary_rows.to(grads.dtype)])
        global_grad = self._private_mean(grads, expected_batch) if s.method.has_global else None
        noise_std = self._update_local(grads, carriers, expected_batch)
        return StepResult(global_grad, loss, int(labels.numel()), noise_std)

    def _carriers(self) -> tuple[Tensor, Tensor, Tensor] | None:
        m, st = self.settings.method, self._state
        if m in {Method.DPFPL, Method.DPLORA}:
            u, v, residual = mechanics.factorise(
                st["local_prompt"], self.settings.rank, self.generator
            )
            if m is Method.DPLORA:
                st["u"], st["v"] = u, v  # the prediction prompt uses the latest carriers
            return u, v, residual
        if m is Method.FEDPGP:
            return st["u"], st["v"], torch.zeros_like(self.global_prompt)
        return None

    def _compose(self, carriers: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        m = self.settings.method
        if m is Method.DPFPL:
            u, v, residual = carriers  # type: ignore[misc]
            return self.global_prompt + u @ v + residual
        if m in {Method.DPLORA, Method.FEDPGP}:
            u, v, _ = carriers  # type: ignore[misc]
            return self.global_prompt + u @ v
        if m in {Method.FEDOTP, Method.SECFPP}:
            return self.global_prompt + self._state["local_prompt"]
        if m is Method.LOCAL:
            return self._state["local_prompt"].clone()
        return self.global_prompt.clone()  # promptfl

    def _private_mean(self, grads: Tensor, expected_batch: float) -> Tensor:
        """Clip as the DP mode says: each sample (then sum / B), the batch mean, or not at all.

        With ``per_sample`` off, ``grads`` is already the batch-mean gradient.
        """
        mode, c = self.settings.dp_mode, self.settings.clip_norm
        if mode is DPMode.PER_SAMPLE:
            return mechanics.clipped_sum(grads, c) / expected_batch
        if mode is DPMode.PAPER:
            return mechanics.clip_tensor(grads, c)
        return grads

    def _noise_std(self, tensors: int, expected_batch: float) -> float:
        s = self.settings
        return local_noise_std(
            s.dp_mode,
            noise_multiplier=s.local_noise_multiplier,
            clip_norm=s.clip_norm,
            expected_batch=expected_batch,
            tensors=tensors,
        )

    def _noised(self, grads: Tensor, std: float, expected_batch: float) -> Tensor:
        mean = self._private_mean(grads, expected_batch)
        if std == 0.0:
            return mean
        return mean + self.noise.gaussian(mean.shape, std=std, dtype=mean.dtype, device=mean.device)

    def _update_local(
        self, grads: Tensor, carriers: tuple[Tensor, Tensor, Tensor] | None, expected_batch: float
    ) -> float:
        m = self.settings.method
        if not m.has_local:
            return 0.0
        if carriers is None:  # fedotp, secfpp, local: the whole local gradient is the channel
            std = self._noise_std(1, expected_batch)
            self._sgd("local_prompt", self._noised(grads, std, expected_batch))
            return std
        u, v, _ = carriers
        # du_j = g_j v^T (n, r), dv_j = u^T g_j (r, d); batched over a leading sample dim
        std = self._noise_std(2, expected_batch)
        du = self._noised(grads @ v.T, std, expected_batch)
        dv = self._noised(u.T @ grads, std, expected_batch)
        if m is Method.FEDPGP:
            self._sgd("u", du)
            self._sgd("v", dv)
        else:
            self._sgd("local_prompt", mechanics.rebuild_local_gradient(du, dv, u, v))
        return std

    def _sgd(self, name: str, grad: Tensor) -> None:
        """SGD with momentum and weight decay (the authors' optimiser), per private tensor."""
        s, param = self.settings, self._state[name]
        step = grad + s.weight_decay * param
        if s.momentum > 0:
            buf = self._momentum.get(name)
            step = step if buf is None else s.momentum * buf + step
            self._momentum[name] = step
        self._state[name] = param - s.lr * step

    # ----- persistence of the private state (node-local only) ----------------------
    def private_state(self) -> dict[str, Tensor]:
        """Private tensors for the node's own disk; never for a Message."""
        state = {k: v.contiguous().clone() for k, v in self._state.items()}
        state.update({f"momentum.{k}": v.contiguous().clone() for k, v in self._momentum.items()})
        return state

    def load_private_state(self, state: dict[str, Tensor]) -> None:
        expected = set(self._state)
        given = {k for k in state if not k.startswith("momentum.")}
        if given != expected:
            raise ValueError(
                f"private state holds {sorted(given)} but method "
                f"{self.settings.method.value!r} needs {sorted(expected)}: was it saved by a "
                "run with another method?"
            )
        for key, value in state.items():
            target = self._momentum if key.startswith("momentum.") else self._state
            name = key.removeprefix("momentum.")
            reference = self._state[name]
            if value.shape != reference.shape:
                raise ValueError(
                    f"private tensor {key!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(reference.shape)}: n-ctx, rank or backbone changed since it was saved"
                )
            target[name] = value.detach().float().clone()
