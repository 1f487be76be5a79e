"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Why not Flower's ``create_shares``/``combine_shares``: they start a thread pool per
call and interpolate in GF(2^128), chunk by chunk, in pure Python through pycryptodome:
measured here (2026-11-30, shared 2-core machine, threshold 9 of 16) 16 ms to split and
52 ms to reconstruct one 32-byte secret, against 0.2 ms and 0.2 ms for this module. The
server's stage 4 reconstructs one seed per survivor and checks every extra share, so
Flower's version would cost tens of seconds per round at 100 clients. Over a Mersenne
prime the whole secret is one field element and Python's big integers do the rest.

A share is ``x`` (4 bytes, little endian, 1..holders) followed by ``y`` (66 bytes).
Coefficients come from ``secrets`` (the OS CSPRNG), so t - 1 shares are independent of
the secret. Reconstruction of a wrong share set gives a uniformly random field element,
which fails the 2^256 range check with probability 1 - 2^-265, and otherwise the
caller's commitment / public-key check.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**521 - 1  # a Mersenne prime > 2^256
SECRET_BYTES = 32
_X_BYTES = 4
_Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = _X_BYTES + _Y_BYTES


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` shares of ``secret``; any ``threshold`` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets have {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= holders < 2**32 - 1:
        raise ValueError(f"need 1 <= threshold <= holders, got {threshold}, {holders}")
    coeffs = [int.from_bytes(secret, "little")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(x.to_bytes(_X_BYTES, "little") + y.to_bytes(_Y_BYTES, "little"))
    return shares


def share_x(share: bytes) -> int:
    """The x-coordinate (holder index, from 1) of a share."""
    return int.from_bytes(share[:_X_BYTES], "little")


def combine(shares: Sequence[bytes]) -> bytes:
    """Lagrange interpolation at 0; ValueError for malformed shares or an out-of-range result."""
    points = []
    for share in shares:
        if len(share) != SHARE_BYTES:
            raise ValueError(f"a share has {SHARE_BYTES} bytes, got {len(share)}")
        x, y = share_x(share), int.from_bytes(share[_X_BYTES:], "little")
        if x == 0 or y >= PRIME:
            raise ValueError("share outside the field")
        points.append((x, y))
    xs = [x for x, _ in points]
    if not points or len(set(xs)) != len(xs):
        raise ValueError("need distinct shares")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent (the result is not a secret)")
    return secret.to_bytes(SECRET_BYTES, "little")
