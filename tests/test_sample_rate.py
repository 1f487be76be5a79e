"""The Poisson rate a node samples at must not depend on its private dataset size.

Under add/remove adjacency, a rate ``B / |D_i|`` changes when one record is added, and
every other record's inclusion probability with it: the accountant's fixed-q bound then
does not hold. This file computes, exactly up to a pessimistic discretisation, the
privacy-loss distribution (PLD) of the 1-D worst case and compares it with the epsilon
the channel plan prints, at the rates the PRODUCTION trainer gives a node of n and of
n + 1 records.

The worst case (units of the per-sample sensitivity C/B, noise std z): dataset D holds
n records at +1, D' the same plus one at -1. A step releases the sum of a Poisson
sample plus N(0, z^2): under D at rate q_n, ``Bin(n, q_n) + N``; under D' at rate
q_{n+1}, ``Bin(n, q_{n+1}) - Bern(q_{n+1}) + N``. The PLD is built per step on a fine
grid of outputs (bin masses from exact normal CDFs, each bin's loss the larger of its
edges' rounded UP to the loss grid, truncated mass counted as infinite loss), composed
T times by FFT, and ``delta(eps) = E_P[(1 - e^{eps - L})_+]`` is evaluated in both
directions. The engine is checked against Google's ``dp_accounting`` on the textbook
fixed-rate case (n = 0).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting import pld
from scipy.optimize import brentq
from scipy.special import logsumexp, ndtr
from scipy.stats import binom

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.config import RunConfig
from dpfpl_app.data.federated_data import ClientData
from dpfpl_app.method.client_trainer import ClientTrainer
from dpfpl_app.privacy.dp_channel import plan_for

DELTA = 1e-5
LOSS_GRID = 1e-4  # the privacy-loss discretisation interval h
OUTPUT_GRID = 1e-3  # the output bins, in noise stds
TAIL_SIGMAS = 12.0  # outputs beyond this many noise stds of every component: infinite loss
WEIGHT_FLOOR = 1e-30  # binomial weights below this: infinite loss too
CLASS_NAMES = ("cat", "dog", "owl")


# --- the PLD engine ---------------------------------------------------------------------
def _components(n: int, rate: float, added: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Shifts and weights of the sampled sum's mixture; the weight dropped (< floor)."""
    k = np.arange(n + 1)
    w = binom.pmf(k, n, rate)
    if added:  # the extra record at -1, included with the same rate
        shifts = np.arange(-1, n + 1)
        w = np.concatenate([w * rate, [0.0]]) + np.concatenate([[0.0], w * (1 - rate)])
    else:
        shifts = k
    keep = w >= WEIGHT_FLOOR
    return shifts[keep].astype(np.float64), w[keep], float(w[~keep].sum())


def _log_density(s: np.ndarray, shifts: np.ndarray, weights: np.ndarray, z: float) -> np.ndarray:
    """Log of sum_k w_k N(s; shift_k, z^2) (the normalising constant cancels in L)."""
    return logsumexp(-0.5 * ((s[:, None] - shifts[None, :]) / z) ** 2, b=weights[None, :], axis=1)


def _bin_masses(edges: np.ndarray, shifts: np.ndarray, weights: np.ndarray, z: float) -> np.ndarray:
    cdf = ndtr((edges[:, None] - shifts[None, :]) / z) @ weights  # exact mixture CDF
    return np.clip(np.diff(cdf), 0.0, None)


def _step_pld(
    z: float, n: int, rate_d: float, rate_d1: float, remove: bool
) -> tuple[int, np.ndarray, float]:
    """One step's discretised PLD: (lowest loss index, pmf over indices, infinite mass).

    ``remove``: P is D' (the record present) and Q is D; else P is D and Q is D'.
    """
    d = _components(n, rate_d, added=False)
    d1 = _components(n, rate_d1, added=True)
    (p_shift, p_w, p_drop), (q_shift, q_w, _) = (d1, d) if remove else (d, d1)
    low = min(p_shift.min(), q_shift.min()) - TAIL_SIGMAS * z
    high = max(p_shift.max(), q_shift.max()) + TAIL_SIGMAS * z
    edges = np.arange(low, high + OUTPUT_GRID * z, OUTPUT_GRID * z)
    loss_at_edges = _log_density(edges, p_shift, p_w, z) - _log_density(edges, q_shift, q_w, z)
    loss = np.maximum(loss_at_edges[:-1], loss_at_edges[1:])  # pessimistic per bin
    mass = _bin_masses(edges, p_shift, p_w, z)
    index = np.ceil(loss / LOSS_GRID).astype(np.int64)  # rounded up: pessimistic again
    lowest = int(index.min())
    pmf = np.bincount(index - lowest, weights=mass)
    infinite = max(0.0, 1.0 - float(mass.sum())) + p_drop
    return lowest, pmf, infinite


def _composed_delta_curve(
    z: float, n: int, rate_d: float, rate_d1: float, steps: int, remove: bool
):  # noqa: ANN202 - a function eps -> delta
    lowest, pmf, infinite = _step_pld(z, n, rate_d, rate_d1, remove)
    size = 1 << int(math.ceil(math.log2(steps * (pmf.size - 1) + 1)))
    composed = np.fft.irfft(np.fft.rfft(pmf, size) ** steps, size)
    composed = np.clip(composed[: steps * (pmf.size - 1) + 1], 0.0, None)
    losses = (steps * lowest + np.arange(composed.size)) * LOSS_GRID
    inf_mass = 1.0 - (1.0 - infinite) ** steps
    positive = losses > 0
    losses, composed = losses[positive], composed[positive]

    def delta(eps: float) -> float:
        return inf_mass + float(np.sum(composed * -np.expm1(np.minimum(eps - losses, 0.0))))

    return delta


def worst_case_epsilon(z: float, n: int, rate_d: float, rate_d1: float, steps: int) -> float:
    """Epsilon at DELTA of T steps of the 1-D worst case, both directions."""
    eps = 0.0
    for remove in (False, True):
        delta = _composed_delta_curve(z, n, rate_d, rate_d1, steps, remove)
        if delta(0.0) > DELTA:
            eps = max(eps, brentq(lambda e, d=delta: d(e) - DELTA, 0.0, 50.0, xtol=1e-6))
    return eps


def _dp_accounting_epsilon(z: float, rate: float, steps: int) -> float:
    mechanism = pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z,
        sensitivity=1.0,
        sampling_prob=rate,
        pessimistic_estimate=True,
        value_discretization_interval=LOSS_GRID,
    )
    return float(mechanism.self_compose(steps).get_epsilon_for_delta(DELTA))


def test_pld_engine_agrees_with_dp_accounting_on_the_textbook_fixed_rate_case() -> None:
    # n = 0: one record in or out, Poisson rate q, Gaussian noise: the textbook pair
    z, rate, steps = 2.0, 0.1, 50
    ours = worst_case_epsilon(z, 0, rate, rate, steps)
    reference = _dp_accounting_epsilon(z, rate, steps)
    assert ours == pytest.approx(reference, rel=5e-3)
    # the same rate for both datasets: D's other records only post-process the release
    assert worst_case_epsilon(z, 40, rate, rate, steps) <= ours + 1e-3
    # and the engine is not blind to a rate that moves: it sees a larger epsilon
    assert worst_case_epsilon(z, 40, rate, 4 / 41, steps) > ours * 1.1


# --- what production does ---------------------------------------------------------------
def _cfg(**values: object) -> RunConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RunConfig.from_flower(
            {"dp-mode": "per-sample", "n-ctx": 4, "rank": 2, **values}  # type: ignore[dict-item]
        )


def _data(clip: FrozenClip, num_train: int) -> ClientData:
    g = torch.Generator().manual_seed(num_train)
    embed = int(clip.model.config.projection_dim)
    feats = F.normalize(torch.randn(num_train + 2, embed, generator=g), dim=-1)
    labels = torch.randint(0, len(CLASS_NAMES), (num_train + 2,), generator=g)
    return ClientData(
        train_features=feats[None, :num_train], train_labels=labels[:num_train],
        local_features=feats[num_train:], local_labels=labels[num_train:],
        neighbour_features=feats[:0], neighbour_labels=labels[:0],
        classes=tuple(range(len(CLASS_NAMES))),
    )


def production_rate(cfg: RunConfig, clip: FrozenClip, num_train: int) -> float:
    """The Poisson rate the production trainer draws at for a node of ``num_train``
    records and no declaration of its own.
    """
    return float(ClientTrainer(cfg, clip, CLASS_NAMES, _data(clip, num_train), partition_id=0)
                 .sample_rate)


@pytest.mark.usefixtures("one_torch_thread")
def test_worst_case_epsilon_of_the_production_rates_is_at_most_the_printed_one(
    clip: FrozenClip,
) -> None:
    # Prepare: configs/rigorous-dpfpl-vitb16.toml's accounting (bound 0.08, B 32, T 100,
    # target 0.4: z = 7.8125, printed 0.396) and a node of 400 images, B/n = the bound
    cfg = _cfg(**{"max-sample-rate": 0.08, "batch-size": 32, "num-server-rounds": 100,
                  "epsilon": 0.4})
    plan = plan_for(cfg)
    n = 400
    rate_n, rate_n1 = production_rate(cfg, clip, n), production_rate(cfg, clip, n + 1)

    # Execute
    worst = worst_case_epsilon(plan.z_step, n, rate_n, rate_n1, plan.planned_steps)

    # Assert: what the node really spends is covered by what the run prints
    printed = plan.epsilon(plan.planned_steps)
    assert worst <= printed, (
        f"a node of {n} images sampled at {rate_n:.5g} and, with one image more, at "
        f"{rate_n1:.5g}: its worst-case epsilon is {worst:.3f}, the run prints {printed:.3f}"
    )
