"""Randomness for every draw a DP guarantee rests on: noise, Poisson batches, node samples.

torch's CPU generator keeps only 32 bits of its seed, so noise drawn from it can be
searched and subtracted by anyone who sees a noised release and knows the rest of the
computation (a 2^32 search takes core-hours). Every draw that the privacy analysis
treats as secret therefore comes from here: a ChaCha20 keystream keyed with 256 bits,
from the OS (``NoiseSource.secure``) or, for experiments that must be reproducible,
from a public seed (``NoiseSource.public``), in which case whatever is derived from it
is marked nominal: an attacker who knows the seed knows the noise.

Gaussian samples are made in float64 by Box-Muller from 53-bit uniforms, then cast to
the caller's dtype, so the tails are as good as float64 allows.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import TypeVar

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32  # ChaCha20 key: 256 bits
_NONCE = bytes(16)  # ChaCha20 counter + nonce: each key is used for exactly one stream
_UNIT = 2.0**-53

T = TypeVar("T")


class NoiseSource:
    """A stream of unpredictable uniforms, Gaussians and samples.

    Parameters
    ----------
    key : bytes
        The 32-byte ChaCha20 key. Whoever holds it can reproduce every draw.
    public : bool
        True when the key is derived from something public (a run-config seed): the
        draws then protect nothing, and every epsilon resting on them is nominal.

    """

    def __init__(self, key: bytes, *, public: bool) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a noise key has {KEY_BYTES} bytes, got {len(key)}")
        self.public = public
        self._stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    @classmethod
    def secure(cls) -> NoiseSource:
        """A fresh 256-bit key from the operating system; never stored anywhere."""
        return cls(os.urandom(KEY_BYTES), public=False)

    @classmethod
    def public_seed(cls, seed: int, *purpose: object) -> NoiseSource:
        """A reproducible stream from a public seed and a purpose (experiments only).

        The purpose parts (e.g. ``"global-noise"``, a partition id, a round) separate
        streams that must not repeat each other; the whole seed goes into SHA-256, so
        seeds differing in any bit give unrelated streams.
        """
        label = "/".join(["dpfpl", str(seed), *(str(p) for p in purpose)])
        return cls(hashlib.sha256(label.encode()).digest(), public=True)

    @classmethod
    def for_run(cls, *, reproducible: bool, seed: int, purpose: Sequence[object]) -> NoiseSource:
        """The source a run uses: public-seeded only when the run config asks for it."""
        return cls.public_seed(seed, *purpose) if reproducible else cls.secure()

    # --- draws --------------------------------------------------------------------
    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms on [0, 1), 53 random bits each."""
        if n < 0:
            raise ValueError(f"cannot draw {n} values")
        raw = self._stream.update(bytes(8 * n))
        words = torch.frombuffer(bytearray(raw), dtype=torch.int64) if n else torch.empty(0)
        # the top 53 bits of each 64-bit word, as a non-negative integer below 2^53
        return ((words >> 11) & ((1 << 53) - 1)).to(torch.float64) * _UNIT

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
