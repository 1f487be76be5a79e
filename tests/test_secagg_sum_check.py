"""The unmasked sum's norm check (issue 28, item 6): tight enough to refuse a poisoned
input a few clip norms too large, never tripped by an honest round.

The noise is the main job's: its secure config (``secure_channel.config_for`` on the
pyproject run config, aggregation secure) for the global prompt of the default backbone
(n-ctx 16 x text width 128 = 2048 entries), with 10 nodes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tomllib
from scipy import stats
from secagg_harness import Federation

from dpfpl_app.config import RunConfig
from dpfpl_app.privacy.secure_channel import config_for
from dpfpl_app.secagg import RoundParams, SecAggAbort, SecAggConfig, fixed_point, skellam
from dpfpl_app.secagg.stream import KeyStream

REPO = Path(__file__).resolve().parents[1]
DIM = 16 * 128  # the main job's global prompt (dpfpl-tiny-digits: text width 128)
NODES = list(range(101, 111))


def main_job_config() -> SecAggConfig:
    run = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config = config_for(RunConfig.from_flower({**run, "aggregation": "secure"}), DIM)
    assert config.sum_noise_std > 0  # the main job's noise, not a noiseless sum
    return config


def aligned_inputs(config: SecAggConfig, poisoned: float) -> dict[int, np.ndarray]:
    """Nine honest inputs at the clip norm and one of norm ``poisoned`` clip norms, all
    along one direction: the honest inputs as large (and as aligned) as they can be.
    """
    direction = np.random.default_rng(0).normal(size=config.dim)
    direction /= np.linalg.norm(direction)
    inputs = {v: (direction * config.clip).astype(np.float32) for v in NODES}
    inputs[NODES[0]] = (direction * config.clip * poisoned).astype(np.float32)
    return inputs


def run_with_poison(config: SecAggConfig, poisoned: float) -> object:
    """One round in which NODES[0] skips its own clip check (a malicious client)."""
    original = fixed_point.quantise

    def unchecked(x, *, clip, scale, stream):  # type: ignore[no-untyped-def]
        k = max(1.0, float(np.linalg.norm(x.astype(np.float64))) / clip)
        return original(x / k, clip=clip, scale=scale * k, stream=stream)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fixed_point, "quantise", unchecked)
        return Federation(config, aligned_inputs(config, poisoned)).run()


def test_an_input_a_few_clip_norms_too_large_is_refused() -> None:
    # Prepare: the main job's noise, 10 nodes; one input of norm 10 C (9 C too large),
    # which 9dded1e's check (m C + sqrt(dim) x the per-coordinate tail, ~144 C) released
    config = main_job_config()

    # Execute / Assert: the round is refused and releases nothing
    with pytest.raises(SecAggAbort, match=r"'secagg_unmask'.*out of bound.*poisoned"):
        run_with_poison(config, poisoned=10.0)


def test_the_same_round_with_the_input_at_its_clip_norm_is_released() -> None:
    result = run_with_poison(main_job_config(), poisoned=1.0)
    assert len(result.survivors) == len(NODES)  # type: ignore[attr-defined]


def test_honest_noise_sums_never_trip_the_bound_and_the_bound_is_chi_square_tight() -> None:
    # Prepare: the noise of an honest 10-survivor sum (production Skellam sampler), and
    # the worst honest inputs: m in-bound inputs aligned (norm A, the bound's input part)
    params = RoundParams.derive(main_job_config(), NODES, bytes(16))
    m, variance = len(NODES), len(NODES) * params.client_variance
    bound = params.sum_norm_bound(m)
    inputs = params.input_norm_bound(m)
    stream = KeyStream.from_seed(0, "honest-noise-sums")
    draws = 400

    # Execute
    noise_sq, worst = [], []
    for _ in range(draws):
        noise = skellam.skellam(variance, params.dim, stream).astype(np.float64)
        noise_sq.append(float(noise @ noise))
        x = np.zeros(params.dim)
        x[0] = inputs  # any direction: the noise is i.i.d. per coordinate
        worst.append(float(np.linalg.norm(x + noise)))

    # Assert: the draws follow the noise model the bound assumes (mean dim * variance,
    # std sqrt(2 dim) * variance, as for a chi-square; loose tolerances for 400 draws)
    z = (np.array(noise_sq) - params.dim * variance) / (math.sqrt(2 * params.dim) * variance)
    assert abs(z.mean()) < 0.3 and 0.7 < z.std() < 1.4
    # the bound's noise part sits above the tail of that model at its probability,
    # 2^-40 / 3 (a normal's is at 7.2 std, the chi-square's at 7.7), far above every
    # draw, and far below 9dded1e's dim x per-coordinate tail (thousands of std here)
    q = skellam.norm_sq_bound(variance, params.dim, 2 * params.wrap_probability / 3)
    q_std = (q - params.dim * variance) / (math.sqrt(2 * params.dim) * variance)
    assert 7.5 < q_std < 12 and z.max() < 5
    tau = skellam.tail_bound(variance, params.wrap_probability / params.dim)
    assert params.dim * tau**2 > 50 * q
    # an honest round at the largest honest inputs stays well inside the whole bound
    assert max(worst) < 0.95 * bound


@pytest.mark.parametrize("dim", [64, 2048])
def test_noise_bound_is_above_the_exact_chi_square_quantile_in_the_gaussian_limit(
    dim: int,
) -> None:
    """At a large variance Skellam noise is Gaussian: the bound must cover the exact
    chi-square quantile at its probability, and be within a few percent of it.
    """
    variance, probability = 1e8, 2.0**-40
    q = skellam.norm_sq_bound(variance, dim, probability)
    exact = variance * stats.chi2.isf(probability / 2, dim)  # half: the truncation's share
    assert exact <= q <= 1.1 * exact
