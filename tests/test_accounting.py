"""Accounting: opacus references, calibration that never overshoots, checkpoint round trips."""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from dpfpl_app.privacy import accounting
from dpfpl_app.privacy.accounting import AccountantKind, PrivacyBudgetError

# the paper's setting with per-sample clipping (ALGORITHM.md section 4)
Q, STEPS, DELTA = 32 / 400, 100, 1e-5


def _opacus_epsilon(kind: AccountantKind, releases: list[tuple[float, float, int]]) -> float:
    """Epsilon from a fresh opacus accountant fed one ``step`` call per release."""
    acc = RDPAccountant() if kind is AccountantKind.RDP else PRVAccountant()
    for z, q, n in releases:
        for _ in range(n):
            acc.step(noise_multiplier=z, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind is AccountantKind.RDP:
            return float(acc.get_epsilon(delta=DELTA, alphas=accounting.RDP_ORDERS))
        return float(acc.get_epsilon(delta=DELTA))


# --- epsilon against opacus -------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(AccountantKind))
@pytest.mark.parametrize("z", [0.8, 2.0, 7.8])
def test_epsilon_for_matches_opacus_accountant(kind: AccountantKind, z: float) -> None:
    # Prepare
    expected = _opacus_epsilon(kind, [(z, Q, STEPS)])

    # Execute
    eps = accounting.epsilon_for(
        noise_multiplier=z, sample_rate=Q, steps=STEPS, delta=DELTA, kind=kind
    )

    # Assert
    assert eps == pytest.approx(expected, rel=1e-9)


def test_extended_rdp_orders_never_loosen_opacus_default_bound() -> None:
    # Prepare: a setting whose optimal order lies above opacus's default grid
    acc = RDPAccountant()
    acc.history = [(50.0, Q, STEPS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = float(acc.get_epsilon(delta=DELTA))

    # Execute
    ours = accounting.epsilon_for(noise_multiplier=50.0, sample_rate=Q, steps=STEPS, delta=DELTA)

    # Assert: a superset of opacus's orders can never be looser, and here it is tighter
    assert set(RDPAccountant.DEFAULT_ALPHAS) <= set(accounting.RDP_ORDERS)
    assert ours < default


@pytest.mark.parametrize(
    ("kind", "target", "reference"),
    [
        # ALGORITHM.md section 4, measured with opacus 1.6
        (AccountantKind.RDP, 0.4, 7.8),
        (AccountantKind.PRV, 0.4, 7.3),
        (AccountantKind.RDP, 0.2, 15.0),
        (AccountantKind.PRV, 0.2, 14.4),
    ],
)
def test_calibrated_noise_matches_reference_values(
    kind: AccountantKind, target: float, reference: float
) -> None:
    # Execute
    z = accounting.calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=Q, steps=STEPS, kind=kind
    )

    # Assert
    assert z == pytest.approx(reference, rel=0.05)


@pytest.mark.parametrize(
    ("kind", "targets"),
    [
        (AccountantKind.RDP, [0.05, 0.1, 0.4, 1.0, 2.0, 8.0]),
        (AccountantKind.PRV, [0.1, 2.0]),
    ],
)
def test_calibrated_noise_never_overshoots_and_is_nearly_minimal(
    kind: AccountantKind, targets: list[float]
) -> None:
    for target in targets:
        # Execute
        z = accounting.calibrate_noise_multiplier(
            target_epsilon=target, delta=DELTA, sample_rate=Q, steps=STEPS, kind=kind
        )

        # Assert: spends at most the target; 2% less noise (twice the bisection's relative
        # tolerance) would exceed it
        def eps(multiplier: float) -> float:
            return accounting.epsilon_for(
                noise_multiplier=multiplier, sample_rate=Q, steps=STEPS, delta=DELTA, kind=kind
            )

        assert eps(z) <= target, (target, z)
        assert eps(0.98 * z) > target, (target, z)


def test_unreachable_target_raises_budget_error_saying_what_to_change() -> None:
    with pytest.raises(PrivacyBudgetError, match=r"epsilon=0\.0001 .* cannot be reached in 1000 "
                       r"steps.*raise the epsilon"):
        accounting.calibrate_noise_multiplier(
            target_epsilon=1e-4, delta=DELTA, sample_rate=1.0, steps=1000
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0.0}, "target epsilon must be > 0"),
        ({"target_epsilon": -1.0}, "target epsilon must be > 0"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"sample_rate": 0.0}, r"sample rate must be in \(0, 1\]"),
        ({"sample_rate": 1.5}, r"sample rate must be in \(0, 1\]"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\)"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
    ],
)
def test_calibration_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    # Prepare
    args: dict[str, float] = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": Q, "steps": 10}
    args.update(kwargs)

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match=message):
        accounting.calibrate_noise_multiplier(**args)  # type: ignore[arg-type]


# --- the paper's formula and composition --------------------------------------------------------
@pytest.mark.parametrize(("epsilon", "reference"), [(0.4, 84.8), (0.2, 169.7)])
def test_paper_noise_multiplier_matches_the_papers_numbers(
    epsilon: float, reference: float
) -> None:
    # Execute
    z = accounting.paper_noise_multiplier(epsilon=epsilon, delta=DELTA, rounds=STEPS)

    # Assert: ALGORITHM.md section 4's figures for T=100, delta=1e-5
    assert z == pytest.approx(reference, abs=0.05)


def test_paper_noise_multiplier_rejects_non_positive_epsilon() -> None:
    with pytest.raises(PrivacyBudgetError, match="paper epsilon must be > 0"):
        accounting.paper_noise_multiplier(epsilon=0.0, delta=DELTA, rounds=STEPS)
