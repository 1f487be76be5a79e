"""Privacy mechanics: factorisation, Eq. 4, clipping, noise, and the local sensitivity."""

from __future__ import annotations

import math

import pytest
import torch

from dpfpl_app.config import DPMode
from dpfpl_app.privacy import mechanics
from dpfpl_app.privacy.dp_channel import local_noise_std

N_CTX, WIDTH = 6, 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Orthonormal columns from a QR of a Gaussian matrix (independent of ``factorise``)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def _projection_on_columns(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the column space of ``a``: a a^+ (no orthonormality used)."""
    return a @ torch.linalg.pinv(a)


# --- Eq. 4 ------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["factorise", "random-orthonormal"])
@pytest.mark.parametrize("rank", [1, 3, N_CTX])
def test_eq4_rebuild_equals_explicit_projections(source: str, rank: int) -> None:
    # Prepare: carriers and a random full gradient g, in float64 to compare tightly
    g = torch.randn(N_CTX, WIDTH, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if source == "factorise":
        p_local = torch.randn(N_CTX, WIDTH, generator=torch.Generator().manual_seed(2))
        u, v, _ = mechanics.factorise(p_local, rank, torch.Generator().manual_seed(3))
        # re-orthonormalise in float64 so the comparison is not limited by float32 rounding
        u, v = torch.linalg.qr(u.double())[0], torch.linalg.qr(v.double().T)[0].T
    else:
        u, v = _orthonormal(N_CTX, rank, seed=4), _orthonormal(WIDTH, rank, seed=5).T
    du, dv = g @ v.T, u.T @ g  # the carrier gradients of the paper (step 3)
    p_u = _projection_on_columns(u)  # (n, n)
    p_v = _projection_on_columns(v.T)  # (d, d): onto the row space of v

    # Execute
    rebuilt = mechanics.rebuild_local_gradient(du, dv, u, v)

    # Assert: the projection identity, and that the remainder is orthogonal to both spaces
    expected = p_u @ g + g @ p_v - p_u @ g @ p_v
    torch.testing.assert_close(rebuilt, expected, rtol=1e-10, atol=1e-10)
    remainder = g - rebuilt
    torch.testing.assert_close(u.T @ remainder, torch.zeros(rank, WIDTH, dtype=torch.float64))
    torch.testing.assert_close(remainder @ v.T, torch.zeros(N_CTX, rank, dtype=torch.float64))


def test_eq4_is_a_projection_rebuilding_twice_changes_nothing() -> None:
    # Prepare
    u, v = _orthonormal(N_CTX, 2, seed=6), _orthonormal(WIDTH, 2, seed=7).T
    g = torch.randn(N_CTX, WIDTH, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    once = mechanics.rebuild_local_gradient(g @ v.T, u.T @ g, u, v)

    # Execute
    twice = mechanics.rebuild_local_gradient(once @ v.T, u.T @ once, u, v)

    # Assert
    torch.testing.assert_close(twice, once)


# --- factorise ----------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, N_CTX])
def test_factorise_gives_orthonormal_carriers_and_exact_residual(rank: int) -> None:
    # Prepare
    p_local = torch.randn(N_CTX, WIDTH, generator=torch.Generator().manual_seed(0)) * 0.02

    # Execute
    u, v, residual = mechanics.factorise(p_local, rank, torch.Generator().manual_seed(1))

    # Assert
    assert u.shape == (N_CTX, rank) and v.shape == (rank, WIDTH)
    torch.testing.assert_close(u.T @ u, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(v @ v.T, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(u @ v + residual, p_local, atol=1e-7, rtol=1e-6)


def test_factorise_is_one_power_iteration_from_a_fresh_gaussian() -> None:
    # Prepare: replay the Gaussian start v0 from an identical generator
    rank = 2
    p_local = torch.randn(N_CTX, WIDTH, generator=torch.Generator().manual_seed(0))
    v0 = torch.randn(WIDTH, rank, generator=torch.Generator().manual_seed(5))

    # Execute
    u, v, _ = mechanics.factorise(p_local, rank, torch.Generator().manual_seed(5))

    # Assert: span(u) = span(p_L v0) and rowspan(v) = rowspan(u^T p_L)
    start = p_local @ v0
    torch.testing.assert_close(_projection_on_columns(u) @ start, start, atol=1e-5, rtol=1e-4)
    back = (u.T @ p_local).T  # (d, r)
    torch.testing.assert_close(_projection_on_columns(v.T) @ back, back, atol=1e-5, rtol=1e-4)


def test_factorise_draws_new_carriers_each_call() -> None:
    # Prepare
    p_local = torch.randn(N_CTX, WIDTH, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)

    # Execute
    u1, _, _ = mechanics.factorise(p_local, 2, gen)
    u2, _, _ = mechanics.factorise(p_local, 2, gen)

    # Assert
    assert not torch.allclose(u1, u2)


@pytest.mark.parametrize("rank", [0, -1, N_CTX + 1])
def test_factorise_rank_out_of_range_raises_naming_rank(rank: int) -> None:
    # Prepare
    p_local = torch.zeros(N_CTX, WIDTH)

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"rank={rank} must be in \[1, min\(n_ctx={N_CTX}"):
        mechanics.factorise(p_local, rank, torch.Generator().manual_seed(0))


# --- clipping -------------------------------------------------------------------------------
ROW_SCALES = [0.0, 1e-30, 1e-3, 0.5, 0.999, 1.0, 1.001, 2.0, 1e3, 1e15]


def _rows_with_norms(norms: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(norms), 3, 5, generator=g, dtype=torch.float64)
    directions = directions / directions.flatten(1).norm(dim=1).reshape(-1, 1, 1)
    return (directions * torch.tensor(norms, dtype=torch.float64).reshape(-1, 1, 1)).float()


@pytest.mark.parametrize("clip", [1e-3, 1.0, 10.0])
def test_clip_rows_norms_never_exceed_clip(clip: float) -> None:
    # Prepare: rows from zero to 1e15 times the clip norm, plus random-scale rows
    norms = [s * clip for s in ROW_SCALES]
    g = torch.Generator().manual_seed(0)
    norms += (10 ** (torch.rand(40, generator=g) * 12 - 6) * clip).tolist()
    rows = _rows_with_norms(norms, seed=1)

    # Execute
    clipped = mechanics.clip_rows(rows, clip)

    # Assert
    out_norms = clipped.flatten(1).norm(dim=1)
    assert torch.isfinite(clipped).all()
    assert (out_norms <= clip * (1 + 1e-5)).all(), out_norms.max()


def test_clip_rows_leaves_small_rows_unchanged_and_keeps_direction_of_large() -> None:
    # Prepare
    clip = 1.0
    rows = _rows_with_norms([0.0, 0.3, 0.999, 3.0, 1e15], seed=2)

    # Execute
    clipped = mechanics.clip_rows(rows, clip)

    # Assert: rows below C are bit-identical; rows above C are rescaled to norm C
    assert torch.equal(clipped[:3], rows[:3])
    for big, out in zip(rows[3:], clipped[3:], strict=True):
        torch.testing.assert_close(out.norm(), torch.tensor(clip))
        torch.testing.assert_close(out, big / big.norm() * clip)


def test_clip_of_a_zero_gradient_is_zero_not_nan() -> None:
    # Prepare
    zeros = torch.zeros(4, 2, 3)

    # Execute
    per_row, whole = mechanics.clip_rows(zeros, 1.0), mechanics.clip_tensor(zeros[0], 1.0)

    # Assert
    assert torch.equal(per_row, zeros) and torch.equal(whole, zeros[0])


def test_clip_rows_of_overflowing_norm_stays_bounded_and_finite() -> None:
    # Prepare: float32 entries whose squared norm overflows to inf
    rows = torch.full((2, 4, 8), 1e25)

    # Execute
    clipped = mechanics.clip_rows(rows, 1.0)

    # Assert: the bound C (what the privacy argument needs) still holds
    assert torch.isfinite(clipped).all()
    assert (clipped.flatten(1).norm(dim=1) <= 1.0).all()


def test_clip_tensor_clips_the_whole_tensor_not_its_rows() -> None:
    # Prepare: 3 rows of norm 0.8 each: whole-tensor norm sqrt(3)*0.8 > 1
    x = _rows_with_norms([0.8, 0.8, 0.8], seed=3)

    # Execute
    clipped = mechanics.clip_tensor(x, 1.0)

    # Assert
    torch.testing.assert_close(clipped.norm(), torch.tensor(1.0))
    torch.testing.assert_close(clipped, x / x.norm())


# --- sensitivity of the local channel ----------------------------------------------------------
def test_local_noise_std_is_multiplier_times_measured_pair_sensitivity() -> None:
    # Prepare: a batch of per-sample carrier gradients, and the same batch plus one sample
    # whose gradients are huge (worst case). Released pair = (sum clip(du_j), sum clip(dv_j))/B.
    clip, batch, z = 2.0, 8, 1.7
    g = torch.Generator().manual_seed(0)
    du, dv = torch.randn(batch, N_CTX, 3, generator=g), torch.randn(batch, 3, WIDTH, generator=g)
    extra_du, extra_dv = 1e6 * torch.randn(1, N_CTX, 3, generator=g), -1e6 * torch.ones(1, 3, WIDTH)

    def release(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ca, cb = mechanics.clip_rows(a, clip).sum(0), mechanics.clip_rows(b, clip).sum(0)
        return torch.cat([ca.flatten(), cb.flatten()]) / batch

    # Execute
    shift = release(torch.cat([du, extra_du]), torch.cat([dv, extra_dv])) - release(du, dv)
    std = local_noise_std(
        DPMode.PER_SAMPLE, noise_multiplier=z, clip_norm=clip, expected_batch=batch, tensors=2
    )

    # Assert: the worst-case shift reaches the stated sensitivity, and std / sensitivity = z
    sensitivity = float(shift.norm())
    assert sensitivity == pytest.approx(math.sqrt(2) * clip / batch, rel=1e-5)
    assert std / sensitivity == pytest.approx(z, rel=1e-5)
