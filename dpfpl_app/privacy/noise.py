"""Torch draws for every value a DP guarantee rests on: noise, Poisson batches, node samples.

torch's CPU generator keeps only 32 bits of its seed, so noise drawn from it can be
searched and subtracted by anyone who sees a noised release and knows the rest of the
computation (a 2^32 search takes core-hours). Every draw that the privacy analysis
treats as secret therefore reads a ChaCha20 keystream (``keystream.py``) keyed with 256
bits, from the OS (``NoiseSource.secure``) or, for experiments that must be
reproducible, from a public seed (``NoiseSource.public_seed``), in which case whatever is
derived from it is marked nominal: an attacker who knows the seed knows the noise.

Gaussian samples are made in float64 by Box-Muller from 53-bit uniforms, then cast to
the caller's dtype, so the tails are as good as float64 allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch

from dpfpl_app.privacy.keystream import KeyStream

T = TypeVar("T")


class NoiseSource:
    """A stream of unpredictable uniforms, Gaussians and samples.

    Parameters
    ----------
    stream : KeyStream
        The ChaCha20 keystream read. Whoever holds its key can reproduce every draw.
    public : bool
        True when the key is derived from something public (a run-config seed): the
        draws then protect nothing, and every epsilon resting on them is nominal.

    """

    def __init__(self, stream: KeyStream, *, public: bool) -> None:
        self.public = public
        self._stream = stream

    @classmethod
    def secure(cls) -> NoiseSource:
        """A fresh 256-bit key from the operating system; never stored anywhere."""
        return cls(KeyStream.secure(), public=False)

    @classmethod
    def public_seed(cls, seed: int, *purpose: object) -> NoiseSource:
        """A reproducible stream from a public seed and a purpose (experiments only).

        The purpose parts (e.g. ``"global-noise"``, a partition id, a round) separate
        streams that must not repeat each other (``KeyStream.from_seed``).
        """
        return cls(KeyStream.from_seed(seed, *purpose), public=True)

    @classmethod
    def for_run(cls, *, reproducible: bool, seed: int, purpose: Sequence[object]) -> NoiseSource:
        """The source a run uses: public-seeded only when the run config asks for it."""
        return cls.public_seed(seed, *purpose) if reproducible else cls.secure()

    # --- draws --------------------------------------------------------------------
    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms on [0, 1), 53 random bits each."""
        if n < 0:
            raise ValueError(f"cannot draw {n} values")
        return torch.from_numpy(self._stream.uniform(n))

    def gaussian(
        self,
        shape: Sequence[int] | torch.Size,
        *,
        std: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """N(0, std^2) samples of the given shape (Box-Muller in float64, then cast)."""
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"noise std must be finite and >= 0, got {std}")
        n = math.prod(shape)
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs]))  # 1 - u in (0, 1]: finite
        angle = (2.0 * math.pi) * u[pairs:]
        normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return (normal * std).reshape(tuple(shape)).to(dtype=dtype, device=device)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent coin flips with probability ``p`` (Poisson sampling)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {p}")
        return self.uniform(n) < p

    def sample(self, population: Sequence[T], k: int) -> list[T]:
        """``k`` distinct items, uniformly at random, in population order."""
        if not 0 <= k <= len(population):
            raise ValueError(f"cannot sample {k} of {len(population)} items")
        keep = torch.argsort(self.uniform(len(population)))[:k].sort().values
        return [population[i] for i in keep.tolist()]
