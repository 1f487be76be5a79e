"""Privacy mechanics in plain torch: factorisation, clipping, Eq. 4.

Nothing here knows about Flower, noise sizes or accounting: these functions transform
gradients. The noise comes from ``noise.py``, its size and the epsilon it buys from
``dp_channel.py``, where the sensitivity of every clipped quantity is written down.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def clipped_sum(per_sample: Tensor, max_norm: float) -> Tensor:
    """Sum over the leading dim of the rows clipped to ``max_norm``, in the rows' dtype.

    The one clipping step of both channels: a client divides it by the expected batch
    size B, the server by the number of replies N (``dp_channel`` has the sensitivities).
    """
    return clip_rows(per_sample, max_norm).sum(dim=0)


def clip_tensor(x: Tensor, max_norm: float) -> Tensor:
    """Scale one tensor to L2 norm at most ``max_norm`` (batch-level clipping)."""
    return clip_rows(x.unsqueeze(0), max_norm).squeeze(0)
