"""The secure global channel: its noise, its accounting with subsampling, its SecAgg config.

With ``aggregation = "secure"`` the server never sees a client's gradient: every client
clips its global-prompt gradient to C, quantises it, adds its share of Skellam noise
and masks it (``secagg``); the server learns only the noised SUM of the survivors'
contributions. This module is torch-free (numpy only) because the key-exchange stages
of a round build the ``SecAggConfig`` in a fresh ClientApp process per message.

Sensitivity (per-sample DP, ``local-steps`` K = 1). A client's gradient is its clipped
per-sample sum divided by the expected batch B, then projected onto the L2 ball of
radius C (the SecAgg input bound). Projection onto a convex set is 1-Lipschitz, so one
sample still moves the client's input, and hence the sum, by at most C/B. We account
the SUM (not a mean) and divide by the actual survivors only afterwards, which is
post-processing: the divisor is public and the sensitivity of the sum does not depend
on it. Randomised rounding (scale s) adds at most sqrt(dim) in integer units
(``secagg.dp.quantised_sensitivity``).

Why K = 1 only: the plain channel splits a round's noise into K per-step pieces, each
a function of one Poisson batch. Here the client rounds the K-step mean once, and the
rounding of a sum is not a sum of per-step roundings, so a piece would depend on the
earlier batches in clear. Per-step quantisation would restore the split; until it
exists, secure per-sample runs need ``local-steps = 1`` (``RunConfig`` enforces it).

The per-step mechanism, on one Poisson sample of rate q (the public bound), releases
jointly the local carriers with Gaussian noise (multiplier z_L, RDP a / (2 z_L^2) at
the plan's sensitivity) and the noised sum, Skellam of variance m/t (s z_G C/B)^2 with
m survivors and t = min_survivors (any t survivors reach the calibrated noise). The RDP
of the pair is the sum of the two curves; the pair is subsampled once with the generic
bound (``secagg.subsampled``: opacus's bound is Gaussian-only), composed over the T
steps, and converted with ``secagg.dp.rdp_to_epsilon``.

Scale and dimension: the fixed-point scale is s = 64 sqrt(dim) B / C, so rounding
inflates the per-sample sensitivity by 1/64 whatever the dimension. The Skellam bound is
then non-increasing in dim (its extra term shrinks like 1/dim), so the plan evaluates it
at dim = 1: a bound valid for every prompt size, which keeps the plan a function of the
run config alone, identical on the server and on clients that never load the model.

Calibration at the MINIMUM survivors t (``calibrate``): each client adds variance
(s sigma)^2 / t, so any t survivors reach it. The epsilon printed after each round uses
the ACTUAL survivors m >= t (more noise: a smaller epsilon); a round that releases no sum
costs the global channel nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dpfpl_app.config import DPMode, RunConfig
from dpfpl_app.privacy.calibration import (
    MAX_NOISE_MULTIPLIER,
    PrivacyBudgetError,
    smallest_multiplier,
)
from dpfpl_app.secagg import SecAggConfig, rdp_to_epsilon, skellam_rdp
from dpfpl_app.secagg.dp import quantised_sensitivity
from dpfpl_app.secagg.subsampled import poisson_subsampled_rdp

# Integer orders only (the subsampled bound is proven there); dense where small epsilons
# with large noise put their optimum, sparse above.
ORDERS: tuple[int, ...] = tuple(range(2, 257)) + (320, 384, 512, 768, 1024)
SCALE_RATIO = 64.0  # integer units per per-sample sensitivity C/B, per sqrt(dim)


@dataclass(frozen=True)
class SecureSetting:
    """The public numbers of the secure channel's per-step mechanism.

    ``z_local`` is the local carriers' multiplier (0: the method has no local noise);
    ``z_global`` the multiplier of the noise on the SUM at t survivors (std z_G C / B);
    ``z_summary`` the multiplier of a one-off Gaussian release before the steps (SecFPP's
    domain summary, ``domain_clusters.release``; 0: none), composed once, unsubsampled.
    """

    sample_rate: float
    z_local: float
    z_global: float
    z_summary: float = 0.0

    def step_rdp(self, survivor_ratio: float | None) -> np.ndarray:
        """Subsampled RDP of one step at ``ORDERS``; ``survivor_ratio`` = m / t.

        ``None``: the round's sum was never released (only the local carriers were).
        """
        return _step_rdp(self, survivor_ratio).copy()

    def _joint(self, ls: np.ndarray, survivor_ratio: float | None) -> np.ndarray:
        """RDP of the pair (local Gaussian, Skellam sum) on one sample: the sum of both."""
        out = ls / (2.0 * self.z_local**2) if self.z_local > 0 else np.zeros_like(ls)
        if survivor_ratio is None:
            return out
        if self.z_global <= 0:
            return np.full_like(ls, math.inf)
        # units where the per-sample sensitivity C/B is 1 and dim = 1 (module docstring)
        d2, d1 = quantised_sensitivity(1.0, SCALE_RATIO, 1)
        variance = survivor_ratio * (SCALE_RATIO * self.z_global) ** 2
        return out + skellam_rdp(
            ls.tolist(), l2_sensitivity=d2, l1_sensitivity=d1, variance=variance
        )

    def summary_rdp(self) -> np.ndarray:
        """RDP of the one-off summary release at ``ORDERS``: a / (2 z^2), no subsampling."""
        if self.z_summary <= 0:
            return np.zeros(len(ORDERS))
        return np.asarray(ORDERS, dtype=np.float64) / (2.0 * self.z_summary**2)

    def epsilon(self, rounds: Sequence[float | None], delta: float) -> float:
        """Epsilon after ``rounds`` (one step each: K = 1), each its survivor ratio or None.

        A one-off summary release (``z_summary``) is counted from the start: it happens
        before the first step, and its RDP curve adds to the steps' (composition).
        """
        total = self.summary_rdp()
        for ratio, count in _counts(rounds).items():
            total += count * self.step_rdp(ratio)
        if not total.any():
            return 0.0
        return rdp_to_epsilon(ORDERS, total, delta)[0]


@lru_cache(maxsize=256)
def _step_rdp(setting: SecureSetting, survivor_ratio: float | None) -> np.ndarray:
    """Cached: the plan asks for the same few curves every round."""
    return poisson_subsampled_rdp(
        lambda ls: setting._joint(ls, survivor_ratio), ORDERS, setting.sample_rate
    )


def _counts(rounds: Sequence[float | None]) -> dict[float | None, int]:
    """Equal ratios share one curve (a run has few distinct survivor counts)."""
    out: dict[float | None, int] = {}
    for ratio in rounds:
        out[ratio] = out.get(ratio, 0) + 1
    return out


def setting_for(
    z_step: float,
    *,
    sample_rate: float,
    global_share: float,
    has_local: bool,
    z_summary: float = 0.0,
) -> SecureSetting:
    """Split the per-step precision z_step^-2 between the channels as the plain plan does."""
    share = global_share if has_local else 1.0
    z_local = z_step / math.sqrt(1.0 - share) if share < 1.0 else 0.0
    return SecureSetting(sample_rate, z_local, z_step / math.sqrt(share), z_summary)


def summary_multiplier(cfg: RunConfig) -> float:
    """The multiplier of SecFPP's summary release: the run config's, in per-sample DP only.

    Other methods release no summary (0). Paper mode has no formal guarantee to compose
    into, and without DP nothing is noised.
    """
    accounted = cfg.dp_on and cfg.dp_mode is DPMode.PER_SAMPLE
    return cfg.summary_noise_multiplier if cfg.method.clustered and accounted else 0.0


@lru_cache(maxsize=8)
def calibrate(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    global_share: float,
    has_local: bool,
    z_summary: float = 0.0,
) -> float:
    """Smallest z_step whose ``steps`` steps at the MINIMUM survivors meet the target.

    The target is the COMPOSED epsilon: with a summary release (``z_summary`` > 0, SecFPP)
    the prompt channels get what the release leaves, so the printed epsilon covers both.
    """
    alone = SecureSetting(sample_rate, 0.0, 0.0, z_summary).epsilon([], delta)
    if alone >= target_epsilon:
        raise PrivacyBudgetError(
            f"SecFPP's summary release alone (summary-noise-multiplier={z_summary:g}) costs "
            f"epsilon {alone:.3g} at delta={delta}, leaving nothing of epsilon="
            f"{target_epsilon} for the prompts: raise summary-noise-multiplier or the epsilon"
        )

    def eps(z: float) -> float:
        setting = setting_for(
            z,
            sample_rate=sample_rate,
            global_share=global_share,
            has_local=has_local,
            z_summary=z_summary,
        )
        return setting.epsilon([1.0] * steps, delta)

    return smallest_multiplier(
        eps,
        target_epsilon,
        unreachable=(
            f"epsilon={target_epsilon} at delta={delta} cannot be reached by the secure "
            f"channel in {steps} steps at sample rate {sample_rate:.4g} with a noise "
            f"multiplier below {MAX_NOISE_MULTIPLIER:g}; raise the epsilon or lower the "
            "number of rounds or the batch size"
        ),
    )


def secagg_config(
    *, dim: int, clip_norm: float, batch_size: int, z_global: float, clustered: bool = False
) -> SecAggConfig:
    """The SecAgg+ configuration of a round (identical on the server and every client).

    ``dim`` is the flattened global prompt's length (SecFPP: k domain prompts, a client
    filling its cluster's block only); ``z_global`` 0 means no DP noise (secure
    aggregation alone). Degree, threshold and release threshold follow the rules of
    ``secagg.params``, except that a ``clustered`` sum needs every sampled node: a
    cluster's block must never be summed over fewer members than opened it.
    """
    sensitivity = clip_norm / batch_size
    return SecAggConfig(
        dim=dim,
        clip=clip_norm,
        sum_noise_std=z_global * sensitivity,
        l2_sensitivity=sensitivity,
        scale=SCALE_RATIO * math.sqrt(dim) / sensitivity,
        require_all=clustered,
    )


def config_for(cfg: RunConfig, dim: int) -> SecAggConfig:
    """The run's SecAgg config from the run config alone: what a client derives itself.

    The server gets the same numbers from its channel plan (``dp_channel``), which runs
    the same calibration; a client compares them in the setup stage and refuses a round
    whose noise or thresholds differ. ``dim`` comes from the server's round parameters:
    a client that was told a wrong one finds out when its gradient does not fit.
    """
    z_global = 0.0
    if cfg.dp_on and cfg.dp_mode is DPMode.PER_SAMPLE:
        z_step = calibrate(
            target_epsilon=cfg.epsilon,
            delta=cfg.delta,
            sample_rate=cfg.max_sample_rate,
            steps=cfg.num_server_rounds * cfg.local_steps,
            global_share=cfg.global_share,
            has_local=cfg.method.has_local,
            z_summary=summary_multiplier(cfg),
        )
        z_global = setting_for(
            z_step,
            sample_rate=cfg.max_sample_rate,
            global_share=cfg.global_share,
            has_local=cfg.method.has_local,
        ).z_global
    return secagg_config(
        dim=dim,
        clip_norm=cfg.clip_norm,
        batch_size=cfg.batch_size,
        z_global=z_global,
        clustered=cfg.method.clustered,
    )
