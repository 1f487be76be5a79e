"""Float vectors to ring elements and back.

Why not ``flwr.common.secure_aggregation.quantization``: it clips each coordinate to a
box (not the L2 ball the sensitivity is stated for), rounds with numpy's global
(non-cryptographic, seedable) generator, and stores int32. Here: an L2 bound that is
REFUSED when exceeded (clipping is the caller's job, done once, before noise),
unbiased randomised rounding floor(scale x + u) with u from a ChaCha20 stream, int64.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputOutOfBound
from .params import CLIP_TOLERANCE
from .stream import KeyStream


def quantise(x: np.ndarray, *, clip: float, scale: float, stream: KeyStream) -> np.ndarray:
    """int64 randomised rounding of ``scale * x``; InputOutOfBound if ||x||_2 > clip.

    E[result] = scale * x exactly; every coordinate moves by less than 1, so the L2
    norm grows by less than sqrt(dim) (the bound ``dp.quantised_sensitivity`` uses).
    """
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise InputOutOfBound("input has NaN or Inf entries")
    norm = float(np.linalg.norm(v))
    if norm > clip * (1 + CLIP_TOLERANCE):
        raise InputOutOfBound(
            f"input L2 norm {norm:.6g} exceeds the bound {clip:.6g}: clip it first"
        )
    scaled = scale * v
    return np.floor(scaled + stream.uniform(v.size)).astype(np.int64)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed int64 -> uint64 residues mod 2^bits (two's complement, then masked)."""
    return values.astype(np.int64).view(np.uint64) & np.uint64((1 << bits) - 1)


def from_ring(residues: np.ndarray, bits: int) -> np.ndarray:
    """uint64 residues mod 2^bits -> signed int64 in [-2^(bits-1), 2^(bits-1))."""
    r = residues.astype(np.uint64) & np.uint64((1 << bits) - 1)
    signed = r.astype(np.int64)
    return np.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)


def dequantise(values: np.ndarray, scale: float) -> np.ndarray:
    """Integer sum -> float64 sum."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return values.astype(np.float64) / scale
