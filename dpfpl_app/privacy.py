"""Privacy mechanics in plain torch: factorisation, clipping, noise, Eq. 4.

Nothing here knows about Flower or about accounting: these functions transform
gradients; ``accounting.py`` turns what was done into an epsilon, and only the client
trainer and the server strategy use both.

Sensitivity of the local channel (per-sample mode), relied on by ``local_noise_std``:
every sample's carrier gradients du_j and dv_j are each clipped to C, summed and divided
by the expected batch size B, so adding or removing one sample moves the pair
(du, dv) by at most sqrt(C^2 + C^2) / B = sqrt(2) C / B in L2. A full-rank local
gradient (FedOTP-like, local CoOp) is one clipped tensor: C / B.
"""

from __future__ import annotations

import math
import secrets

import torch
from torch import Tensor


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A noise generator: seeded for reproducible tests, from OS entropy otherwise.

    torch's generators are not cryptographic; seeding from ``secrets`` keeps the noise
    unpredictable across processes, which is what a deployment without a CSPRNG can do.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def orthonormal_columns(x: Tensor) -> Tensor:
    """Orthonormal basis of the column space of x (reduced QR, signs fixed)."""
    q, r = torch.linalg.qr(x, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs


def factorise(
    local_prompt: Tensor, rank: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """One power iteration: gradient carriers u (n, r), v (r, d) and residual R = p_L - u v.

    Not a best rank-r approximation (that would need an SVD per step); a fresh Gaussian
    start each step is what lets the carriers wander over the whole space across steps.
    ``u`` has orthonormal columns and ``v`` orthonormal rows, which Eq. 4 relies on.
    """
    n_ctx, width = local_prompt.shape
    if not 1 <= rank <= min(n_ctx, width):
        raise ValueError(f"rank={rank} must be in [1, min(n_ctx={n_ctx}, width={width})]")
    v0 = torch.randn(width, rank, generator=generator, device=local_prompt.device)
    u = orthonormal_columns(local_prompt @ v0)  # (n, r)
    v = orthonormal_columns(local_prompt.T @ u).T  # (r, d), rows orthonormal
    residual = local_prompt - u @ v
    return u, v, residual


def rebuild_local_gradient(du: Tensor, dv: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Paper Eq. 4: ``du v + u dv - u u^T du v``.

    With du = g v^T and dv = u^T g this is P_u g + g P_v - P_u g P_v: the projection of g
    on the column space of u plus on the row space of v, minus their overlap, counted
    once. (The public code adds the third term and divides by 10; we do neither.)
    """
    return du @ v + u @ dv - u @ (u.T @ du) @ v


def clip_rows(per_sample: Tensor, max_norm: float) -> Tensor:
    """Scale each sample's tensor (leading dim) to L2 norm at most ``max_norm``.

    The factor is ``C / max(norm, C)``: 1 for small (and zero) gradients, so it can
    never divide by zero.
    """
    flat = per_sample.flatten(1)  # (B, -1); also valid for an empty batch
    norms = torch.linalg.vector_norm(flat, dim=1)
    factors = max_norm / torch.clamp(norms, min=max_norm)
    return per_sample * factors.reshape(-1, *([1] * (per_sample.dim() - 1)))


def clip_tensor(x: Tensor, max_norm: float) -> Tensor:
    """Scale one tensor to L2 norm at most ``max_norm`` (batch-level clipping)."""
    return clip_rows(x.unsqueeze(0), max_norm).squeeze(0)


def gaussian_noise(like: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """N(0, std^2) noise shaped like ``like``, drawn from the given generator."""
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return noise * std


def local_noise_std(
    *, noise_multiplier: float, clip_norm: float, expected_batch: float, tensors: int
) -> float:
    """Noise std for ``tensors`` separately clipped per-sample means (module docstring)."""
    return noise_multiplier * math.sqrt(tensors) * clip_norm / expected_batch
