"""Accounting of the distributed Skellam mechanism against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.special import ive

from dpfpl_app.secagg import DistributedSkellam, SecAggConfig, rdp_to_epsilon, skellam_rdp
from dpfpl_app.secagg.dp import client_variance_for, quantised_sensitivity
from dpfpl_app.secagg.params import RoundParams


def skellam_log_pmf(variance: float, ks: np.ndarray) -> np.ndarray:
    """Log P(Sk = k) = log(e^-mu I_|k|(mu)), scipy's scaled Bessel function (not dp.py)."""
    with np.errstate(divide="ignore"):
        return np.log(ive(np.abs(ks), variance))


def renyi_divergence_of_shift(variance: float, shift: int, order: int) -> float:
    """D_order(Sk + shift || Sk), summed numerically over a support wide enough for the tails."""
    half = int(variance + 40 * math.sqrt(variance) + 40 * order * abs(shift) + 200)
    ks = np.arange(-half, half + 1)
    log_p = skellam_log_pmf(variance, ks - shift)
    log_q = skellam_log_pmf(variance, ks)
    inside = np.isfinite(log_p) & np.isfinite(log_q)  # Bessel underflow only far in the tails
    terms = order * log_p[inside] + (1 - order) * log_q[inside]
    top = terms.max()
    if max(terms[0], terms[-1]) > top - 60:  # the truncated tails must not matter
        raise AssertionError("support too narrow for this case")
    return float((top + math.log(np.exp(terms - top).sum())) / (order - 1))


@pytest.mark.parametrize("variance", [30.0, 200.0, 2000.0])
@pytest.mark.parametrize("shift", [1, 4])
@pytest.mark.parametrize("order", [2, 5, 16, 40])
def test_closed_form_bounds_the_exact_renyi_divergence_and_is_tight(
    variance: float, shift: int, order: int
) -> None:
    exact = renyi_divergence_of_shift(variance, shift, order)
    bound = skellam_rdp([order], l2_sensitivity=shift, l1_sensitivity=shift, variance=variance)[0]
    assert exact <= bound * (1 + 1e-9)
    if variance >= 200:  # where the mechanism is used (mu >> order * shift): the bound is tight
        assert bound <= 1.25 * exact


def test_bound_holds_for_a_vector_shift() -> None:
    """Independent coordinates: the divergence is the sum over coordinates."""
    shift, variance, order = (3, -2, 1), 150.0, 8
    exact = sum(renyi_divergence_of_shift(variance, s, order) for s in shift)
    l2, l1 = math.sqrt(sum(s * s for s in shift)), sum(abs(s) for s in shift)
    assert exact <= skellam_rdp([order], l2_sensitivity=l2, l1_sensitivity=l1, variance=variance)[0]


def test_large_variance_approaches_the_gaussian_mechanism() -> None:
    """Against opacus's Gaussian RDP at the same std: never below it, within 1% when mu is large."""
    orders = [1.5, 2, 4, 8, 16, 32, 63]
    d2 = 100.0
    variance = (3.0 * d2) ** 2  # noise multiplier 3
    ours = skellam_rdp(orders, l2_sensitivity=d2, l1_sensitivity=d2 * 90, variance=variance)
    gaussian = compute_rdp(
        q=1.0, noise_multiplier=3.0, steps=1, orders=[math.ceil(a) for a in orders]
    )
    assert np.all(ours >= gaussian) and np.all(ours <= 1.01 * gaussian)


def test_epsilon_conversion_matches_opacus() -> None:
    orders = [1.1, 1.5, 2.0, 3.0, 8.0, 32.0, 63.0]
    rdp = np.array([0.01, 0.05, 0.1, 0.2, 0.9, 4.0, 8.0])
    for delta in (1e-5, 1e-3):
        assert rdp_to_epsilon(orders, rdp, delta) == pytest.approx(
            get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        )


def test_non_integer_orders_are_charged_at_their_ceiling() -> None:
    kw = dict(l2_sensitivity=5.0, l1_sensitivity=20.0, variance=400.0)
    a = skellam_rdp([1.1, 1.9, 2.0, 2.5, 3.0], **kw)
    assert a[0] == a[1] == a[2] and a[3] == a[4] and a[2] < a[4]


def test_more_survivors_mean_less_privacy_loss_and_min_survivors_reach_the_target() -> None:
    config = SecAggConfig(dim=8192, clip=1.0, sum_noise_std=2.0)
    params = RoundParams.derive(config, range(10), bytes(16))
    acc = params.accounting()
    orders = [2, 8, 32]
    curves = [acc.rdp(orders, m) for m in range(params.min_survivors, 11)]
    assert all(np.all(b < a) for a, b in zip(curves, curves[1:], strict=False))
    assert acc.noise_std(params.min_survivors) == pytest.approx(2.0)
    assert acc.noise_std(10) == pytest.approx(2.0 * math.sqrt(10 / params.min_survivors))


def test_epsilon_of_the_calibrated_noise_is_close_to_the_gaussian_one() -> None:
    """Z = 1 relative to the rounding-inflated sensitivity: epsilon within 1% of a Gaussian's."""
    dim, clip, scale = 8192, 1.0, 64 * math.sqrt(8192)
    d2, _ = quantised_sensitivity(clip, scale, dim)
    mech = DistributedSkellam(scale=scale, dim=dim, client_variance=d2**2 / 7, l2_sensitivity=clip)
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    ours = mech.epsilon(orders, survivors=7, delta=1e-5, rounds=30)
    gaussian = get_privacy_spent(
        orders=orders,
        rdp=compute_rdp(
            q=1.0, noise_multiplier=1.0, steps=30, orders=[math.ceil(a) for a in orders]
        ),
        delta=1e-5,
    )[0]
    assert gaussian <= ours <= 1.01 * gaussian


def test_rounding_inflates_the_sensitivity_by_at_most_sqrt_dim() -> None:
    rng = np.random.default_rng(0)
    scale, dim = 50.0, 64
    d2, d1 = quantised_sensitivity(0.1, scale, dim)
    for _ in range(200):  # shared-uniform coupling of two neighbouring inputs
        x = rng.normal(size=dim)
        step = rng.normal(size=dim)
        x2 = x + 0.1 * step / np.linalg.norm(step)
        u = rng.uniform(size=dim)
        diff = np.floor(scale * x + u) - np.floor(scale * x2 + u)
        assert np.linalg.norm(diff) <= d2 and np.abs(diff).sum() <= d1


@pytest.mark.parametrize("m", [3, 7, 10])
def test_client_variance_reaches_the_target_for_any_m_at_or_above_the_minimum(m: int) -> None:
    mu = client_variance_for(0.5, 1000.0, min_survivors=3)
    assert m * mu >= (0.5 * 1000.0) ** 2 * (1 - 1e-12)


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="orders must be > 1"):
        skellam_rdp([1.0], l2_sensitivity=1, l1_sensitivity=1, variance=1)
    with pytest.raises(ValueError, match="delta must be in"):
        rdp_to_epsilon([2], [1.0], 0.0)
    assert skellam_rdp([2], l2_sensitivity=1, l1_sensitivity=1, variance=0)[0] == math.inf
