"""Mask expansion on ChaCha20 keystreams (``dpfpl_app.privacy.keystream``): PRG(seed) over the ring.

Why not ``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``: it folds
the seed into 32 bits (XOR of 4-byte words) and expands it with numpy's Mersenne
Twister, so a mask can be searched in 2^32 tries and MT is predictable from its
output; it also draws ``randint(0, num_range - 1)``, i.e. never the top ring element,
so its masks are not uniform over the ring. Here a 256-bit key drives ChaCha20, the
project's one keystream (``dpfpl_app.privacy.keystream``, numpy only: this package must import
without torch, see ``__init__``), which also draws every secret random value here.

Each key is used for exactly one stream, so the all-zero nonce is safe: mask seeds are
derived per round and per pair (``crypto.derive_key``), and draw keys come from the OS.
"""

from __future__ import annotations

import numpy as np

from dpfpl_app.privacy.keystream import KeyStream

__all__ = ["KeyStream", "MAX_RING_BITS", "ring_mask"]

MAX_RING_BITS = 62  # uint64 arithmetic wraps at 2^64; keep a margin for signed decoding


def ring_mask(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """The mask PRG(seed): ``dim`` elements uniform on Z_{2^bits}, as uint64.

    Uniform because 2^bits divides 2^64: keeping the low ``bits`` bits of a uniform
    word is exact, no rejection needed.
    """
    if not 1 <= bits <= MAX_RING_BITS:
        raise ValueError(f"ring bits must be in [1, {MAX_RING_BITS}], got {bits}")
    return KeyStream(seed).words(dim) & np.uint64((1 << bits) - 1)
