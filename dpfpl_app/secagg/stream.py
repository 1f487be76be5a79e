"""ChaCha20 keystreams as numpy arrays: mask expansion and every secret random draw.

Why not ``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``: it folds
the seed into 32 bits (XOR of 4-byte words) and expands it with numpy's Mersenne
Twister, so a mask can be searched in 2^32 tries and MT is predictable from its
output; it also draws ``randint(0, num_range - 1)``, i.e. never the top ring element,
so its masks are not uniform over the ring. Here a 256-bit key drives ChaCha20 (the
same idea as ``dpfpl_app.noise.NoiseSource``, without torch: this package must import
without it, see ``__init__``).

Each key is used for exactly one stream, so the all-zero nonce is safe: mask seeds are
derived per round and per pair (``crypto.derive_key``), and draw keys come from the OS.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
_NONCE = bytes(16)
_UNIT = 2.0**-53
MAX_RING_BITS = 62  # uint64 arithmetic wraps at 2^64; keep a margin for signed decoding


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
        """A reproducible stream from a PUBLIC seed: tests and benchmarks only."""
        label = "/".join(["dpfpl-secagg", str(seed), *(str(p) for p in purpose)])
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


def ring_mask(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """The mask PRG(seed): ``dim`` elements uniform on Z_{2^bits}, as uint64.

    Uniform because 2^bits divides 2^64: keeping the low ``bits`` bits of a uniform
    word is exact, no rejection needed.
    """
    if not 1 <= bits <= MAX_RING_BITS:
        raise ValueError(f"ring bits must be in [1, {MAX_RING_BITS}], got {bits}")
    return KeyStream(seed).words(dim) & np.uint64((1 << bits) - 1)
