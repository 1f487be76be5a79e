"""The numpy-only samplers and PRG: distributions, reproducibility, tails."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ive
from scipy.stats import chi2

from dpfpl_app.secagg.skellam import poisson, skellam, tail_bound
from dpfpl_app.secagg.stream import KeyStream, ring_mask


@pytest.mark.parametrize("lam", [0.5, 3.0, 9.99, 10.0, 57.3, 1e6])
def test_poisson_mean_and_variance(lam: float) -> None:
    n = 40_000
    x = poisson(lam, n, KeyStream.from_seed(1, "poisson", lam))
    assert abs(x.mean() - lam) < 5 * math.sqrt(lam / n)
    assert abs(x.var() / lam - 1) < 5 * math.sqrt(2 / n) + 0.01


def _chi2_pvalue(samples: np.ndarray, variance: float) -> float:
    ks = np.arange(samples.min(), samples.max() + 1)
    expected = ive(np.abs(ks), variance) * samples.size  # e^-mu I_k(mu): the Skellam pmf
    observed = np.bincount(samples - samples.min(), minlength=ks.size)
    keep = expected >= 5  # pool the sparse tails into one bin
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], samples.size - expected[keep].sum())
    return float(chi2.sf(((obs - exp) ** 2 / exp).sum(), obs.size - 1))


@pytest.mark.parametrize("variance", [6.0, 300.0, 5000.0])  # inversion and PTRS paths
def test_skellam_matches_its_pmf(variance: float) -> None:
    samples = skellam(variance, 50_000, KeyStream.from_seed(2, "skellam", variance))
    assert _chi2_pvalue(samples, variance) > 1e-4


def test_a_wrong_sampler_fails_the_same_test() -> None:
    """Power check: a Skellam with 10% too much variance is rejected."""
    samples = skellam(330.0, 50_000, KeyStream.from_seed(3))
    assert _chi2_pvalue(samples, 300.0) < 1e-4


def test_streams_are_reproducible_and_separated_by_purpose() -> None:
    a = KeyStream.from_seed(7, "x").words(8)
    assert np.array_equal(a, KeyStream.from_seed(7, "x").words(8))
    assert not np.array_equal(a, KeyStream.from_seed(7, "y").words(8))
    assert not np.array_equal(KeyStream.secure().words(4), KeyStream.secure().words(4))
    u = KeyStream.from_seed(7).uniform(10_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


@pytest.mark.parametrize("variance", [4.0, 1000.0])
@pytest.mark.parametrize("probability", [1e-3, 1e-12])
def test_tail_bound_holds_and_is_not_vacuous(variance: float, probability: float) -> None:
    tau = tail_bound(variance, probability)
    ks = np.arange(tau + 1, tau + 50 * math.sqrt(variance) + 200)
    exact_tail = 2 * ive(ks, variance).sum()
    assert exact_tail <= probability
    looser = np.arange(int(tau / 1.4) + 1, tau + 50 * math.sqrt(variance) + 200)
    assert (
        2 * ive(looser, variance).sum() > probability
    )  # the bound is within 40% of the true quantile


@pytest.mark.parametrize("bits", [18, 62])
def test_ring_mask_is_uniform_on_the_ring(bits: int) -> None:
    seed = bytes(range(32))
    mask = ring_mask(seed, 16_000, bits)
    assert mask.dtype == np.uint64 and int(mask.max()) < 2**bits
    top = np.bincount((mask >> np.uint64(bits - 4)).astype(np.int64), minlength=16)
    assert chi2.sf(((top - 1000) ** 2 / 1000).sum(), 15) > 1e-4
    assert np.array_equal(mask, ring_mask(seed, 16_000, bits))
    assert not np.array_equal(mask, ring_mask(bytes(32), 16_000, bits))
