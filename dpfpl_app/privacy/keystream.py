"""ChaCha20 keystreams: the project's one source of unpredictable randomness.

Every draw a privacy or security argument rests on (DP noise, Poisson batches, node
samples, secure-aggregation masks and noise) reads a ChaCha20 keystream keyed with 256
bits: from the OS in production, or derived from a public seed for reproducible
experiments (whoever knows the seed knows every draw). numpy only, no torch, so the
secure-aggregation stages can import it in a light process.

Each key is used for exactly one stream, so the all-zero nonce is safe.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
_NONCE = bytes(16)
_UNIT = 2.0**-53


class KeyStream:
    """An endless ChaCha20 keystream read as bytes, uint64 words or float64 uniforms."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a stream key has {KEY_BYTES} bytes, got {len(key)}")
        self._encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    @classmethod
    def secure(cls) -> KeyStream:
        """A fresh 256-bit key from the operating system (production draws)."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: int | str, *purpose: object) -> KeyStream:
        """A reproducible stream from a PUBLIC seed (experiments, tests, benchmarks only).

        The whole seed and the purpose parts go into SHA-256, so seeds differing in any
        bit, or purposes differing in any part, give unrelated streams.
        """
        label = "/".join(["dpfpl", str(seed), *(str(p) for p in purpose)])
        return cls(hashlib.sha256(label.encode()).digest())

    def bytes(self, n: int) -> bytes:
        """The next ``n`` keystream bytes."""
        if n < 0:
            raise ValueError(f"cannot draw {n} bytes")
        return self._encryptor.update(bytes(n))

    def words(self, n: int) -> np.ndarray:
        """``n`` uniform uint64 words."""
        return np.frombuffer(self.bytes(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms on [0, 1) with 53 random bits each."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) * _UNIT
