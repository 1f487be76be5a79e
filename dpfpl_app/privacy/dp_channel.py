"""The DP channel end to end: mode -> noise multipliers -> accounting -> epsilon -> meaning.

The client trainer, the strategy, the prompt export and the results all read their
noise and their epsilon from one :class:`ChannelPlan` built from the public run config,
so the server and every client agree on every number without exchanging any.

Sensitivities (per-sample mode), written here once and relied on by ``local_std`` and
``global_std``. One sample of client i is added or removed; every per-sample gradient is
clipped to C and every sum divided by the EXPECTED batch size B (never the drawn size):

* local carriers (du, dv), each clipped to C:       sqrt(2) C / B   (dpfpl, dplora, fedpgp)
* a full-rank local gradient:                         C / B           (fedotp, secfpp, local)
* the global gradient a client sends:                 C / B; the server's UNWEIGHTED mean
  over the N accepted replies moves by C / (B N).

Composition (what the printed epsilon covers). The client's global gradient is taken at
``p_G + p_L(D_i)``, so the global release depends on the data through the local updates
too: the sensitivity C/(BN) holds only for a fixed p_L. What holds is the composition of
both channels on the same Poisson batches. Split the server's noise on a round's mean of
K local-step gradients into K independent pieces (the released sum is post-processing of
the pieces); local step k then releases, from batch k, the noised carriers and piece k:
two Gaussian answers on one subsample, i.e. one Gaussian mechanism whose multiplier obeys
``z_step^-2 = z_L^-2 + (K z_G^2)^-1``. The guarantee for everything released about a
client's training data (the sequence of broadcast global prompts AND the client's
personalised prompt, which is post-processing of both) is ``T K`` subsampled Gaussian
steps with ``z_step`` at the public sampling-rate bound q. The user's target epsilon is
that composed figure; ``global-share`` s splits the per-step precision z_step^-2 between
the channels: ``z_L = z_step / sqrt(1 - s)``, ``z_G = z_step / sqrt(K s)``.

Secure aggregation (``aggregation = "secure"``) replaces the server's Gaussian on the
global channel with Skellam noise the clients add under SecAgg+ masking: the same
split of z_step, accounted with a generic subsampled-RDP bound (``secure_channel``).

SecFPP adds one more release before the first step: each client's domain summary, a
Gaussian mechanism of multiplier ``summary-noise-multiplier`` on its sensitivity (no
subsampling: every image is in it). Its RDP curve is added to the steps' and the
prompt channels are calibrated so that the COMPOSED epsilon meets the target: one
figure for everything a client releases, its clustering included (``docs/secfpp.md``).

Sampling rates (``sample_rate``). Each node draws its Poisson batches at a rate fixed
before its data is read: the rate its organisation declares (node config
``sample-rate``), else the rate of its share of the public simulation partition plan,
else the run's bound ``max-sample-rate`` itself (``federation.node_rate``). A rate
derived from the private dataset size (``min(bound, B/|D_i|)``, the rule before) is
not a fixed q: adding one record lowers every other record's inclusion probability,
and the accountant's bound no longer holds (``tests/test_sample_rate.py``). The noise
is calibrated at the bound; every sum is divided by the public B; a node's own epsilon
is accounted at its own declared rate (``epsilon(steps, rate)``), which is never above
the bound: a higher one is refused before training (``check_rate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis

from dpfpl_app.config import Aggregation, DPMode, Method, RunConfig
from dpfpl_app.privacy import accounting, secure_channel
from dpfpl_app.privacy.accounting import AccountantKind
from dpfpl_app.privacy.calibration import PrivacyBudgetError
from dpfpl_app.privacy.secure_channel import ORDERS as RDP_CURVE_ORDERS
from dpfpl_app.privacy.secure_channel import SecureSetting
from dpfpl_app.secagg import rdp_to_epsilon

NODE_RATE_KEY = "sample-rate"
"""Node config key of the Poisson rate an organisation declares for its node."""
BOUND_KEY = "max-sample-rate"
"""Run config key of the public bound on every node's rate (the noise is sized for it)."""


class SampleRateError(PrivacyBudgetError):
    """A node's declared rate is not one the run's accounting covers."""


class Guarantee(str, Enum):
    """What a printed epsilon means (never a number without its meaning)."""

    ACCOUNTED = "accounted"  # sample-level (epsilon, delta)-DP from an accountant
    NOMINAL_PAPER = "nominal-paper"  # the paper's figure: batch clipping, no formal bound
    NOMINAL_PUBLIC_SEED = "nominal-public-seed"  # noise derived from the public seed
    NO_DP = "no-dp"  # data used without noise: no privacy
    NOTHING_RELEASED = "nothing-released"  # the method learns nothing from the data


MEANINGS = {
    Guarantee.ACCOUNTED: (
        "sample-level (epsilon, delta)-DP of everything released about a client's training "
        "data (every broadcast global prompt and the client's personalised prompt), both "
        "noisy channels composed on the same Poisson batches"
    ),
    Guarantee.NOMINAL_PAPER: (
        "dp-mode=paper: the paper's nominal figure (batch-mean clipping, "
        "advanced-composition sigma); NOT a formal sample-level guarantee"
    ),
    Guarantee.NOMINAL_PUBLIC_SEED: (
        "reproducible-noise=true: the noise is derived from the public seed, so anyone "
        "who knows the run config can subtract it; the epsilon is nominal, NOT a guarantee"
    ),
    Guarantee.NO_DP: "no differential privacy: the data is used without noise",
    Guarantee.NOTHING_RELEASED: "the method trains nothing on the data",
}

CLUSTERED_MEANING = (
    "sample-level (epsilon, delta)-DP of everything released about a client's training "
    "data: its domain summary (one Gaussian release, from which its every clustering "
    "input and cluster choice are computed), every broadcast domain prompt and its "
    "personalised prompt; the summary release and both prompt channels composed"
)

HONEST_SERVER = (
    "the server sees each client's clipped global-prompt gradient in clear (honest-server "
    "assumption, as in the paper): the epsilon protects against everyone who sees only the "
    "broadcast global prompts and the released personalised prompts, not against the server"
)

SECURE_SERVER = (
    "secure aggregation: the server sees only the noised SUM of at least min-survivors "
    "clients' clipped global-prompt gradients, never one client's; the global noise is "
    "added by the clients (Skellam), so the epsilon holds against a server that follows "
    "the protocol, and against one that does not (substituted keys, false survivor "
    "lists) only for nodes that sign their rounds (node config secagg-signing-key and "
    "secagg-registry; an unsigned node assumes an honest server); c colluding clients "
    "can remove their own noise shares, leaving the noise of the other survivors: a "
    "weaker guarantee (docs/secure-aggregation.md)"
)


@dataclass(frozen=True)
class ChannelPlan:
    """The noise of both channels and the accounting of their composition, for one run."""

    mode: DPMode
    method: Method
    aggregation: Aggregation
    guarantee: Guarantee
    delta: float
    accountant: AccountantKind
    sample_rate: float  # the public bound q the noise is calibrated for
    local_steps: int  # K
    rounds: int  # T
    clip_norm: float
    batch_size: int
    target_epsilon: float
    z_step: float  # composed multiplier per local step (0 without DP)
    z_local: float  # local-channel multiplier (0: no local noise)
    z_global: float  # global-channel multiplier (0: no global noise)
    z_summary: float = 0.0  # SecFPP's one summary release (0: none), in the epsilon

    @property
    def planned_steps(self) -> int:
        return self.rounds * self.local_steps

    @property
    def meaning(self) -> str:
        if self.method.clustered and self.guarantee is Guarantee.ACCOUNTED:
            return CLUSTERED_MEANING
        if self.method.clustered and self.guarantee is Guarantee.NOMINAL_PUBLIC_SEED:
            return (
                f"{MEANINGS[self.guarantee]}; the figure composes the domain summary release "
                "with both prompt channels"
            )
        return MEANINGS[self.guarantee]

    @property
    def secure(self) -> bool:
        return self.aggregation is Aggregation.SECURE

    @property
    def server_view(self) -> str:
        """What the server sees of a client's global-prompt gradient, in words."""
        return SECURE_SERVER if self.secure else HONEST_SERVER

    @property
    def secure_setting(self) -> SecureSetting:
        """The secure channel's per-step mechanism at the bound (``secure_channel``)."""
        return self.secure_setting_at(self.sample_rate)

    def secure_setting_at(self, rate: float) -> SecureSetting:
        """The secure channel's per-step mechanism for a node sampling at ``rate``."""
        return SecureSetting(
            self.check_rate(rate), self.z_local, self.z_global, self.z_summary
        )

    def check_rate(self, rate: float) -> float:
        """``rate`` if the accounting covers a node sampling at it, else SampleRateError."""
        if not 0.0 < rate <= 1.0:
            raise SampleRateError(
                f"sample rate {rate!r} is not in (0, 1]: set node config {NODE_RATE_KEY} "
                "to the Poisson rate this node samples at (`dpfpl sample-rate` suggests one)"
            )
        if rate > self.sample_rate:
            raise SampleRateError(
                f"declared sample rate {rate:g} (node config {NODE_RATE_KEY}) is above the "
                f"run's bound {BOUND_KEY}={self.sample_rate:g}, for which the noise is sized: "
                f"lower the node's {NODE_RATE_KEY} to at most {self.sample_rate:g}, or run "
                f"with {BOUND_KEY} >= {rate:g}"
            )
        return rate

    # --- noise ------------------------------------------------------------------------
    def global_std(self, accepted: int) -> float:
        """Std of the noise on the unweighted mean of ``accepted`` clients' gradients."""
        return global_noise_std(
            noise_multiplier=self.z_global,
            clip_norm=self.clip_norm,
            batch_size=self.batch_size,
            accepted=accepted,
        )

    # --- epsilon --------------------------------------------------------------------------
    def epsilon(self, steps_done: int, rate: float | None = None) -> float:
        """The composed epsilon after ``steps_done`` local steps of a node sampling at
        ``rate`` (default: the bound, which covers every node; see the module docstring).
        """
        if self.guarantee is Guarantee.NOTHING_RELEASED:
            return 0.0
        if self.guarantee is Guarantee.NO_DP:
            return math.inf
        if self.guarantee is Guarantee.NOMINAL_PAPER:
            return self.target_epsilon
        q = self.sample_rate if rate is None else self.check_rate(rate)
        if self.secure:  # every step at the minimum survivors: the client's upper bound
            return self.secure_setting_at(q).epsilon([1.0] * steps_done, self.delta)
        if self.accountant is AccountantKind.RDP:
            return rdp_epsilon(self.rdp_curve(q, steps_done, accounting.RDP_ORDERS),
                               accounting.RDP_ORDERS, self.delta)
        return _epsilon(self.z_step, q, steps_done, self.delta, self.accountant)

    def rdp_curve(
        self, rate: float, steps: int, orders: tuple[float, ...] | list[float] = RDP_CURVE_ORDERS
    ) -> np.ndarray:
        """RDP of ``steps`` composed steps of a node sampling at ``rate``, at ``orders``.

        The one curve both the printed RDP epsilon and a node's budget ledger
        (``privacy.budget``) are computed from; curves of different runs add up (RDP
        composition). Secure plans: every step at the minimum survivors (the node's
        own upper bound), at the secure channel's integer orders only, SecFPP's summary
        release included from step 0. A plan without
        an accounted guarantee has an infinite curve, one that releases nothing a zero one.
        """
        summary = self.secure and self.z_summary > 0  # released before the first step
        if (steps <= 0 and not summary) or self.guarantee is Guarantee.NOTHING_RELEASED:
            return np.zeros(len(orders))
        if self.guarantee not in ACCOUNTED_KINDS:
            return np.full(len(orders), math.inf)
        q = self.check_rate(rate)
        if self.secure:
            if tuple(orders) != RDP_CURVE_ORDERS:
                raise ValueError("the secure channel's RDP is computed at its own ORDERS only")
            setting = self.secure_setting_at(q)  # the summary is released once, not per step
            return setting.summary_rdp() + steps * setting.step_rdp(1.0)
        return _plain_rdp(self.z_step, q, steps, tuple(orders)).copy()

    def secure_epsilon(self, rounds: list[float | None], rate: float | None = None) -> float:
        """The secure run's epsilon from each round's survivors / min-survivors ratio.

        ``None`` marks a round whose sum was never released but whose clients trained
        (their local carriers were released). Only for accounted secure plans. ``rate``:
        a node's declared rate (default: the bound).
        """
        if not self.secure or self.guarantee not in ACCOUNTED_KINDS:
            raise ValueError(f"secure_epsilon needs an accounted secure plan, not {self}")
        q = self.sample_rate if rate is None else self.check_rate(rate)
        return self.secure_setting_at(q).epsilon(rounds, self.delta)

    def components(self, steps_done: int) -> dict[str, float]:
        """Each channel's epsilon as if it were the only one (a component, not a bound)."""
        if self.mode is not DPMode.PER_SAMPLE or self.z_step == 0.0:
            return {}
        if self.secure:
            local = SecureSetting(self.sample_rate, self.z_local, 0.0)
            alone = SecureSetting(self.sample_rate, 0.0, self.z_global)
            out = {
                "eps-local-alone": local.epsilon([None] * steps_done, self.delta),
                "eps-global-alone": alone.epsilon([1.0] * steps_done, self.delta),
            }
            if self.z_summary > 0:
                summary = SecureSetting(self.sample_rate, 0.0, 0.0, self.z_summary)
                out["eps-summary-alone"] = summary.epsilon([], self.delta)
            return out
        out = {}
        if self.z_local > 0:
            out["eps-local-alone"] = _epsilon(
                self.z_local, self.sample_rate, steps_done, self.delta, self.accountant
            )
        if self.z_global > 0:
            out["eps-global-alone"] = _epsilon(
                self.z_global * math.sqrt(self.local_steps),
                self.sample_rate,
                steps_done,
                self.delta,
                self.accountant,
            )
        return out

    def describe(self) -> dict[str, float | int | str]:
        """The public numbers behind the epsilon, for results files and recomputation."""
        return {
            "guarantee": self.guarantee.value,
            "meaning": self.meaning,
            "aggregation": self.aggregation.value,
            "accountant": self.accountant.value,
            "delta": self.delta,
            "sample-rate-bound": self.sample_rate,
            "local-steps": self.local_steps,
            "planned-steps": self.planned_steps,
            "target-epsilon": self.target_epsilon,
            "noise-multiplier-step": self.z_step,
            "noise-multiplier-local": self.z_local,
            "noise-multiplier-global": self.z_global,
            **({"noise-multiplier-summary": self.z_summary} if self.z_summary > 0 else {}),
        }


def plan_for(cfg: RunConfig) -> ChannelPlan:
    """The run's channel plan (cached: calibration costs a bisection over the accountant).

    ``aggregation = "auto"`` plans as plain, what it means in a simulation (SecFPP: as
    secure, its only mode). Against real SuperNodes the ServerApp resolves it to secure
    before planning (``server_run``), and each ClientApp resolves its copy from the mode
    the message states (``client_app``).
    """
    auto = Aggregation.SECURE if cfg.method.clustered else Aggregation.PLAIN
    return _plan(
        cfg.dp_mode if cfg.dp_on else DPMode.OFF,
        cfg.method,
        auto if cfg.aggregation is Aggregation.AUTO else cfg.aggregation,
        cfg.reproducible_noise,
        cfg.delta,
        AccountantKind(cfg.accountant.value),
        cfg.max_sample_rate,
        cfg.local_steps,
        cfg.num_server_rounds,
        cfg.clip_norm,
        cfg.batch_size,
        cfg.epsilon,
        cfg.global_share,
        secure_channel.summary_multiplier(cfg),
    )


def local_noise_std(
    mode: DPMode, *, noise_multiplier: float, clip_norm: float, expected_batch: float, tensors: int
) -> float:
    """Std of the noise on each of ``tensors`` separately clipped local means.

    Per-sample mode: the tensors together have sensitivity sqrt(tensors) C / B, so
    ``z sqrt(tensors) C / B``. Paper mode: the authors' C / B, one tensor at a time.
    """
    if noise_multiplier == 0.0 or mode is DPMode.OFF:
        return 0.0
    if mode is DPMode.PAPER:
        return noise_multiplier * clip_norm / expected_batch
    return noise_multiplier * math.sqrt(tensors) * clip_norm / expected_batch


def global_noise_std(
    *, noise_multiplier: float, clip_norm: float, batch_size: float, accepted: int
) -> float:
    """Std of the noise on the unweighted mean of ``accepted`` clipped client gradients:
    ``z C / (B N)``, the multiplier times the mean's sensitivity.
    """
    if noise_multiplier == 0.0 or accepted < 1:
        return 0.0
    return noise_multiplier * clip_norm / (batch_size * accepted)


@lru_cache(maxsize=32)
def _plan(
    mode: DPMode,
    method: Method,
    aggregation: Aggregation,
    reproducible: bool,
    delta: float,
    kind: AccountantKind,
    rate: float,
    k: int,
    rounds: int,
    clip: float,
    batch: int,
    epsilon: float,
    share: float,
    z_summary: float,
) -> ChannelPlan:
    if mode is DPMode.OFF:
        trains = method is not Method.ZEROSHOT
        guarantee = Guarantee.NO_DP if trains else Guarantee.NOTHING_RELEASED
        z_step = z_local = z_global = 0.0
    elif mode is DPMode.PAPER:
        guarantee = Guarantee.NOMINAL_PAPER
        z_step = 0.0
        z_local = (
            accounting.paper_noise_multiplier(epsilon=epsilon, delta=delta, rounds=rounds * k)
            if method.has_local
            else 0.0
        )
        z_global = (
            accounting.paper_noise_multiplier(epsilon=epsilon, delta=delta, rounds=rounds)
            if method.has_global
            else 0.0
        )
    else:
        guarantee = Guarantee.NOMINAL_PUBLIC_SEED if reproducible else Guarantee.ACCOUNTED
        if aggregation is Aggregation.SECURE:
            z_step = secure_channel.calibrate(
                target_epsilon=epsilon,
                delta=delta,
                sample_rate=rate,
                steps=rounds * k,
                global_share=share,
                has_local=method.has_local,
                z_summary=z_summary,
            )
            setting = secure_channel.setting_for(
                z_step, sample_rate=rate, global_share=share, has_local=method.has_local
            )
            z_local, z_global = setting.z_local, setting.z_global
        else:
            z_step = accounting.calibrate_noise_multiplier(
                target_epsilon=epsilon, delta=delta, sample_rate=rate, steps=rounds * k, kind=kind
            )
            global_share = (
                share if method.has_local and method.has_global else float(method.has_global)
            )
            z_local = z_step / math.sqrt(1.0 - global_share) if global_share < 1.0 else 0.0
            z_global = z_step / math.sqrt(k * global_share) if global_share > 0.0 else 0.0
    return ChannelPlan(
        mode=mode,
        method=method,
        aggregation=aggregation,
        guarantee=guarantee,
        delta=delta,
        accountant=kind,
        sample_rate=rate,
        local_steps=k,
        rounds=rounds,
        clip_norm=clip,
        batch_size=batch,
        target_epsilon=epsilon,
        z_step=z_step,
        z_local=z_local,
        z_global=z_global,
        z_summary=z_summary if guarantee in ACCOUNTED_KINDS else 0.0,
    )


ACCOUNTED_KINDS = frozenset({Guarantee.ACCOUNTED, Guarantee.NOMINAL_PUBLIC_SEED})


def rdp_epsilon(curve: np.ndarray, orders: tuple[float, ...] | list[float], delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve (Balle et al. 2020, as opacus converts);
    inf for an infinite curve, 0 for a zero one.
    """
    if not np.isfinite(curve).any():
        return math.inf
    if not curve.any():
        return 0.0
    return rdp_to_epsilon(orders, curve, delta)[0]


@lru_cache(maxsize=256)
def _plain_rdp(z: float, rate: float, steps: int, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus's RDP of ``steps`` Poisson-subsampled Gaussian steps (cached per rate)."""
    return np.asarray(
        rdp_analysis.compute_rdp(q=rate, noise_multiplier=z, steps=steps, orders=list(orders)),
        dtype=np.float64,
    )


@lru_cache(maxsize=4096)
def _epsilon(z: float, rate: float, steps: int, delta: float, kind: AccountantKind) -> float:
    if steps <= 0:
        return 0.0
    return accounting.epsilon_for(
        noise_multiplier=z, sample_rate=rate, steps=steps, delta=delta, kind=kind
    )
