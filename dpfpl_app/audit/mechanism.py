"""The two noisy releases of DP-FPL, and neighbouring inputs with a worst-case canary.

The release functions are built from the production pieces: the clipping step both
channels use (``privacy.clipped_sum``), the noise sizes of the channel plan
(``dp_channel.local_noise_std``, ``dp_channel.global_noise_std``) and the noise source
(``NoiseSource``), so the audit attacks the arithmetic the client and the server run.

Sensitivities the audit puts under test (the canary's clipped contribution sits
exactly at them, so the noise-to-shift ratio is the noise multiplier z):

* local step: per-sample carrier gradients du_j = g_j v^T and dv_j = u^T g_j, each
  clipped to C, summed, divided by the expected batch B; one sample moves (du, dv) by
  at most sqrt(2) C / B, and each gets noise of std z sqrt(2) C / B.
* global aggregation: each client's per-sample-clipped sum / B, an unweighted mean
  over N clients; one sample moves it by at most C / (B N), noise std z C / (B N).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from dpfpl_app.config import DPMode
from dpfpl_app.privacy.dp_channel import global_noise_std, local_noise_std
from dpfpl_app.privacy.mechanics import clipped_sum, factorise
from dpfpl_app.privacy.noise import NoiseSource

# The canary's per-sample gradient is this many clip norms long: a correct clip brings
# it back to exactly C (the sensitivity bound), a missing or loose one shows at once.
CANARY_NORM_FACTOR = 100.0
# The background inputs are public to a white-box adversary; any fixed seed will do.
_BACKGROUND_SEED = 0


class Channel(str, Enum):
    """Which release of DP-FPL is audited."""

    LOCAL = "local"
    GLOBAL = "global"


def local_step_release(
    per_sample_grads: Tensor,
    u: Tensor,
    v: Tensor,
    *,
    clip_norm: float,
    expected_batch: float,
    noise_multiplier: float,
    noise: NoiseSource,
) -> tuple[Tensor, Tensor]:
    """Noised carrier gradients (du, dv) of one local step (module docstring).

    ``per_sample_grads`` is (b, n_ctx, d): each sample's gradient g_j of the loss with
    respect to the prompt; ``u`` (n_ctx, r) and ``v`` (r, d) are the step's carriers.
    """
    du = per_sample_grads @ v.T  # (b, n_ctx, r)
    dv = u.T @ per_sample_grads  # (b, r, d)
    du_mean = clipped_sum(du, clip_norm) / expected_batch
    dv_mean = clipped_sum(dv, clip_norm) / expected_batch
    std = local_noise_std(
        DPMode.PER_SAMPLE,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        expected_batch=expected_batch,
        tensors=2,
    )
    return (
        du_mean + noise.gaussian(du_mean.shape, std=std, dtype=du_mean.dtype),
        dv_mean + noise.gaussian(dv_mean.shape, std=std, dtype=dv_mean.dtype),
    )


def global_aggregate_release(
    client_grads: Sequence[Tensor],
    *,
    clip_norm: float,
    expected_batch: float,
    noise_multiplier: float,
    noise: NoiseSource,
) -> Tensor:
    """Noised unweighted mean of the clients' per-sample-clipped global gradients.

    ``client_grads[i]`` is (b_i, n_ctx, d): client i's per-sample gradients with respect
    to the global prompt.
    """
    if not client_grads:
        raise ValueError("the aggregate needs at least one client")
    clients = len(client_grads)
    per_client = torch.stack([clipped_sum(g, clip_norm) / expected_batch for g in client_grads])
    mean = clipped_sum(per_client, clip_norm) / clients  # the server's re-clip, unweighted
    std = global_noise_std(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        batch_size=expected_batch,
        accepted=clients,
    )
    return mean + noise.gaussian(mean.shape, std=std, dtype=mean.dtype)


@dataclass(frozen=True)
class CanaryGame:
    """Two neighbouring inputs of one release: a fixed background with or without a canary.

    ``release(with_canary, noise)`` runs the mechanism once and returns the release
    flattened to one vector; ``direction`` is the unit vector along which the canary
    moves it (what the optimal test for a Gaussian mechanism projects on);
    ``observed`` says in words what the adversary sees.
    """

    channel: Channel
    noise_multiplier: float
    release: Callable[[bool, NoiseSource], Tensor]
    direction: Tensor
    observed: str


def _background(
    count: int, shape: tuple[int, ...], clip_norm: float, gen: torch.Generator
) -> Tensor:
    """Per-sample gradients of norms around C, some above it so clipping is exercised."""
    return torch.randn(count, *shape, generator=gen) * (clip_norm / math.sqrt(math.prod(shape)))


def local_step_game(
    *,
    noise_multiplier: float,
    clip_norm: float = 10.0,
    batch: int = 8,
    n_ctx: int = 4,
    width: int = 16,
    rank: int = 2,
) -> CanaryGame:
    """One local step on a fixed batch, with or without a canary sample.

    The canary's gradient is ``a u_0 v_0`` (first carrier column times first carrier
    row, a = CANARY_NORM_FACTOR C): as u has orthonormal columns and v orthonormal
    rows, its du = a u_0 e_0^T and dv = a e_0 v_0 both have norm a, so after clipping
    both sit at C and the pair moves by exactly sqrt(2) C / B.
    """
    gen = torch.Generator().manual_seed(_BACKGROUND_SEED)
    local_prompt = torch.randn(n_ctx, width, generator=gen)
    u, v, _ = factorise(local_prompt, rank, gen)
    background = _background(batch, (n_ctx, width), clip_norm, gen)
    canary = CANARY_NORM_FACTOR * clip_norm * torch.outer(u[:, 0], v[0])  # (n_ctx, width)
    with_canary = torch.cat([background, canary.unsqueeze(0)])  # (batch + 1, n_ctx, width)
    shift_du = torch.outer(u[:, 0], torch.eye(rank, dtype=u.dtype)[0])  # u_0 e_0^T
    shift_dv = torch.outer(torch.eye(rank, dtype=v.dtype)[0], v[0])  # e_0 v_0
    direction = torch.cat([shift_du.flatten(), shift_dv.flatten()]) / math.sqrt(2.0)

    def release(include: bool, noise: NoiseSource) -> Tensor:
        du, dv = local_step_release(
            with_canary if include else background,
            u,
            v,
            clip_norm=clip_norm,
            expected_batch=batch,
            noise_multiplier=noise_multiplier,
            noise=noise,
        )
        return torch.cat([du.flatten(), dv.flatten()])

    return CanaryGame(
        channel=Channel.LOCAL,
        noise_multiplier=noise_multiplier,
        release=release,
        direction=direction,
        observed=(
            f"the noised carrier gradients (du {n_ctx}x{rank}, dv {rank}x{width}) of one "
            f"local step on a known batch of {batch}, carriers u, v known"
        ),
    )


def global_round_game(
    *,
    noise_multiplier: float,
    clip_norm: float = 10.0,
    batch: int = 8,
    clients: int = 4,
    n_ctx: int = 4,
    width: int = 16,
) -> CanaryGame:
    """One server aggregation of known client batches, with or without a canary in client 0.

    The canary is a per-sample gradient of norm CANARY_NORM_FACTOR C in a fixed
    direction; clipped to C it moves the mean by exactly C / (B N).
    """
    gen = torch.Generator().manual_seed(_BACKGROUND_SEED)
    backgrounds = [_background(batch, (n_ctx, width), clip_norm, gen) for _ in range(clients)]
    direction = torch.randn(n_ctx, width, generator=gen)
    direction = direction / torch.linalg.vector_norm(direction)
    canary = CANARY_NORM_FACTOR * clip_norm * direction
    first_with = torch.cat([backgrounds[0], canary.unsqueeze(0)])  # (batch + 1, n_ctx, width)

    def release(include: bool, noise: NoiseSource) -> Tensor:
        grads = [first_with, *backgrounds[1:]] if include else backgrounds
        return global_aggregate_release(
            grads,
            clip_norm=clip_norm,
            expected_batch=batch,
            noise_multiplier=noise_multiplier,
            noise=noise,
        ).flatten()

    return CanaryGame(
        channel=Channel.GLOBAL,
        noise_multiplier=noise_multiplier,
        release=release,
        direction=direction.flatten(),
        observed=(
            f"the noised mean global gradient ({n_ctx}x{width}) of {clients} clients with "
            f"known batches of {batch}, the canary in client 0"
        ),
    )


def canary_game(
    channel: Channel, *, noise_multiplier: float, clip_norm: float, batch: int, clients: int
) -> CanaryGame:
    """The game of a channel with the run's clip norm, batch and number of clients."""
    if channel is Channel.LOCAL:
        return local_step_game(noise_multiplier=noise_multiplier, clip_norm=clip_norm, batch=batch)
    return global_round_game(
        noise_multiplier=noise_multiplier, clip_norm=clip_norm, batch=batch, clients=clients
    )
