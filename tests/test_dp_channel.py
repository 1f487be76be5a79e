"""The channel plan: composition of both channels, calibration, and an independent accountant.

The composed epsilon is what the software prints for everything released about a client's
data, so it is checked against Google's ``dp_accounting`` (a privacy-loss-distribution
accountant written independently of opacus), not against our own formula.
"""

from __future__ import annotations

import math
import warnings

import dp_accounting as dpa
import pytest
import torch
from dp_accounting import pld

from dpfpl_app.config import RunConfig
from dpfpl_app.privacy import accounting, mechanics
from dpfpl_app.privacy.accounting import AccountantKind
from dpfpl_app.privacy.dp_channel import Guarantee, SampleRateError, plan_for

DELTA = 1e-5


def _plan(**values: object):  # noqa: ANN202 - a ChannelPlan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paper mode and public seeds warn, as they should
        return plan_for(RunConfig.from_flower({"dp-mode": "per-sample", **values}))


def _pld_epsilon(event: dpa.DpEvent) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(event)
    return float(accountant.get_epsilon(DELTA))


def _pld_subsampled(z: float, q: float, steps: int) -> float:
    return _pld_epsilon(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    )


@pytest.mark.parametrize(("method", "local_steps"), [("dpfpl", 1), ("dpfpl", 3), ("fedotp", 2)])
def test_one_steps_two_releases_are_one_gaussian_mechanism(method: str, local_steps: int) -> None:
    # Prepare: the local carriers (z_L) and the step's piece of the global noise
    # (sqrt(K) z_G), released from the same batch; dp_accounting composes the two itself
    plan = _plan(method=method, **{"local-steps": local_steps, "global-share": 0.3})
    pieces = [
        dpa.GaussianDpEvent(plan.z_local),
        dpa.GaussianDpEvent(math.sqrt(local_steps) * plan.z_global),
    ]

    # Execute
    separate = _pld_epsilon(dpa.ComposedDpEvent(pieces))
    joint = _pld_epsilon(dpa.GaussianDpEvent(plan.z_step))

    # Assert
    assert joint == pytest.approx(separate, rel=2e-3)


# q, T, K, target: the main job, the paper's rigorous setting, several local steps
SETTINGS = [(0.5, 30, 1, 4.0), (0.08, 100, 1, 0.4), (0.25, 20, 3, 2.0)]


@pytest.mark.parametrize(("q", "rounds", "k", "target"), SETTINGS)
def test_composed_epsilon_agrees_with_google_dp_accounting(
    q: float, rounds: int, k: int, target: float
) -> None:
    # Prepare
    common = {
        "max-sample-rate": q,
        "num-server-rounds": rounds,
        "local-steps": k,
        "epsilon": target,
    }
    rdp, prv = _plan(**common), _plan(**common, accountant="prv")

    # Execute
    reference_rdp = _pld_subsampled(rdp.z_step, q, rounds * k)
    reference_prv = _pld_subsampled(prv.z_step, q, rounds * k)

    # Assert: RDP is an upper bound on the tight (PLD) figure; PRV matches it closely
    assert reference_rdp <= rdp.epsilon(rdp.planned_steps) <= 1.3 * reference_rdp
    assert prv.epsilon(prv.planned_steps) == pytest.approx(reference_prv, rel=0.03)
    assert rdp.epsilon(rdp.planned_steps) <= target and prv.epsilon(prv.planned_steps) <= target


def test_the_issues_recomputation_of_the_old_main_job() -> None:
    # Two channels at 3.0156 each were printed as epsilon 3.99; composed they are 6.2 / 5.7
    z = (2 * 3.0156**-2) ** -0.5
    ours = accounting.epsilon_for(noise_multiplier=z, sample_rate=32 / 73, steps=30, delta=DELTA)
    assert ours == pytest.approx(6.21, abs=0.01)
    assert _pld_subsampled(z, 32 / 73, 30) == pytest.approx(5.68, abs=0.02)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_calibration_reaches_the_target_and_never_overshoots(kind: str) -> None:
    plan = _plan(accountant=kind, epsilon=2.0, **{"num-server-rounds": 20})

    spent = plan.epsilon(plan.planned_steps)
    tighter = accounting.epsilon_for(
        noise_multiplier=0.985 * plan.z_step,
        sample_rate=plan.sample_rate,
        steps=plan.planned_steps,
        delta=DELTA,
        kind=AccountantKind(kind),
    )

    assert spent <= 2.0 < tighter


def test_global_share_moves_noise_between_channels_not_the_guarantee() -> None:
    low, high = _plan(**{"global-share": 0.2}), _plan(**{"global-share": 0.8})

    assert low.z_step == high.z_step
    assert high.z_global < low.z_global and high.z_local > low.z_local
    assert low.epsilon(30) == high.epsilon(30)


@pytest.mark.parametrize(
    ("values", "guarantee", "epsilon"),
    [
        ({"dp-mode": "paper", "epsilon": 0.4}, Guarantee.NOMINAL_PAPER, 0.4),
        ({"reproducible-noise": True}, Guarantee.NOMINAL_PUBLIC_SEED, None),
        ({"dp-mode": "off"}, Guarantee.NO_DP, math.inf),
        ({"dp-mode": "off", "method": "zeroshot"}, Guarantee.NOTHING_RELEASED, 0.0),
    ],
)
def test_every_epsilon_says_what_it_means(
    values: dict[str, object], guarantee: Guarantee, epsilon: float | None
) -> None:
    plan = _plan(**values)

    assert plan.guarantee is guarantee and plan.meaning
    if epsilon is not None:
        assert plan.epsilon(10) == epsilon
    else:  # a public seed changes the meaning of the number, not the number
        assert plan.epsilon(10) == _plan().epsilon(10)
        assert "nominal" in plan.meaning and "NOT a guarantee" in plan.meaning


def test_global_noise_is_the_multiplier_times_the_measured_sensitivity() -> None:
    # Prepare: N clients' clipped sums / B, averaged; one client gains a huge sample
    clip, batch, clients = 2.0, 8, 3
    plan = _plan(**{"clip-norm": clip, "batch-size": batch})
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(batch, 4, 6, generator=g, dtype=torch.float64) for _ in range(clients)]
    extra = 1e6 * torch.randn(1, 4, 6, generator=g, dtype=torch.float64)

    def mean(per_client: list[torch.Tensor]) -> torch.Tensor:
        sent = torch.stack([mechanics.clipped_sum(x, clip) / batch for x in per_client])
        return mechanics.clipped_sum(sent, clip) / clients  # the server's re-clip and mean

    # Execute
    shift = mean([torch.cat([grads[0], extra]), *grads[1:]]) - mean(grads)

    # Assert: the worst case reaches C / (B N), and std / sensitivity = z_G
    sensitivity = float(shift.norm())
    assert sensitivity == pytest.approx(clip / (batch * clients), rel=1e-3)
    assert plan.global_std(clients) / (clip / (batch * clients)) == pytest.approx(plan.z_global)


def test_a_declared_rate_above_the_public_bound_is_refused_naming_both_keys() -> None:
    plan = _plan(**{"max-sample-rate": 0.2, "batch-size": 32})
    with pytest.raises(SampleRateError, match=r"sample-rate.*max-sample-rate=0\.2"):
        plan.check_rate(0.64)
    assert plan.check_rate(0.032) == 0.032


def test_a_node_is_accounted_at_its_declared_rate_never_above_the_bound() -> None:
    # the bound's epsilon covers every node; a node declaring less has a smaller one,
    # computed from the same RDP curve the budget ledger composes
    plan = _plan(**{"max-sample-rate": 0.2, "batch-size": 32, "num-server-rounds": 20})
    at_bound, low = plan.epsilon(20), plan.epsilon(20, 0.05)
    assert low < at_bound == plan.epsilon(20, 0.2)
    assert plan.rdp_curve(0.05, 20)[0] < plan.rdp_curve(0.2, 20)[0]
    ours = plan.epsilon(20)
    assert ours == pytest.approx(
        accounting.epsilon_for(noise_multiplier=plan.z_step, sample_rate=0.2, steps=20,
                               delta=plan.delta), rel=1e-9)
