"""Symmetric Skellam noise: the integer noise each client adds before masking.

Why Skellam (Agarwal, Kairouz, Liu, NeurIPS 2021) and not the distributed discrete
Gaussian (Kairouz, Liu, Steinke, ICML 2021): a sum of independent Skellam variables is
*exactly* Skellam with the summed variance, so the noise in the unmasked sum of m
survivors is exactly Sk(m * mu_client) whatever m is, and the closed-form RDP bound
(``dp.skellam_rdp``) applies to it directly. A sum of discrete Gaussians is only close
to a discrete Gaussian, with an extra approximation term that grows as the per-client
variance shrinks. Both survive quantisation and modular summation (they are integer);
Skellam's exact closure makes "account with the actual number of survivors" exact.

Convention (the paper's): Sk(mu) = Pois(mu/2) - Pois(mu/2), variance mu per coordinate.

Samples come from a ChaCha20 ``KeyStream`` (not numpy's generators, whose seeds and
states are small and predictable): Poisson by inversion below ``_PTRS_MIN`` and by
Hormann's transformed rejection with squeeze (PTRS, 1993) above, vectorised.
"""

from __future__ import annotations

import math

import numpy as np

from .stream import KeyStream

_PTRS_MIN = 10.0  # PTRS is valid for lambda >= 10; inversion is cheap below
_LGAMMA = np.frompyfunc(math.lgamma, 1, 1)


def poisson(lam: float, n: int, stream: KeyStream) -> np.ndarray:
    """``n`` independent Pois(lam) samples as int64."""
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"Poisson mean must be finite and >= 0, got {lam}")
    if lam == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    return _poisson_inversion(lam, n, stream) if lam < _PTRS_MIN else _poisson_ptrs(lam, n, stream)


def skellam(variance: float, n: int, stream: KeyStream) -> np.ndarray:
    """``n`` independent Sk(variance) samples: difference of two Pois(variance/2)."""
    if not (variance >= 0 and math.isfinite(variance)):
        raise ValueError(f"Skellam variance must be finite and >= 0, got {variance}")
    return poisson(variance / 2, n, stream) - poisson(variance / 2, n, stream)


def _poisson_inversion(lam: float, n: int, stream: KeyStream) -> np.ndarray:
    """Sequential search of the CDF, all samples at once (lam < 10: < ~60 steps)."""
    u = stream.uniform(n)
    k = np.zeros(n, dtype=np.int64)
    pmf = math.exp(-lam)
    cdf = np.full(n, pmf)
    active = u >= cdf
    j = 0
    while active.any():
        j += 1
        pmf *= lam / j
        k[active] += 1
        cdf[active] += pmf
        active &= u >= cdf
        if pmf == 0.0:  # float64 CDF exhausted (u within 1e-16 of 1): stop at the tail
            break
    return k


def _poisson_ptrs(lam: float, n: int, stream: KeyStream) -> np.ndarray:
    """Hormann's PTRS: a transformed-rejection proposal, a squeeze, an exact test."""
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    v_r = 0.9277 - 3.6224 / (b - 2)
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        m = todo.size
        u = stream.uniform(m) - 0.5
        v = stream.uniform(m)
        us = 0.5 - np.abs(u)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
        ok = np.isfinite(k)
        accept = ok & (us >= 0.07) & (v <= v_r)
        reject = ~ok | (k < 0) | ((us < 0.013) & (v > us))
        test = ~accept & ~reject
        if test.any():
            kt, ut, vt = k[test], us[test], v[test]
            with np.errstate(divide="ignore"):
                lhs = np.log(vt) + log_inv_alpha - np.log(a / (ut * ut) + b)
            rhs = -lam + kt * loglam - _LGAMMA(kt + 1).astype(np.float64)
            accept[np.flatnonzero(test)[lhs <= rhs]] = True
        out[todo[accept]] = k[accept].astype(np.int64)
        todo = todo[~accept]
    return out


def tail_bound(variance: float, probability: float) -> int:
    """An integer tau with P(|Sk(variance)| > tau) <= probability (Chernoff bound).

    The MGF of Sk(mu) is exp(mu (cosh l - 1)), so P(Z >= tau) <= exp(-(l tau - mu
    (cosh l - 1))) at the optimum l = asinh(tau / mu); doubled for both tails. Used to
    size the ring and to bound the unmasked sum's norm.
    """
    if not 0 < probability < 1:
        raise ValueError(f"tail probability must be in (0, 1), got {probability}")
    if variance <= 0:
        return 0
    target = math.log(probability / 2)

    def log_tail(tau: float) -> float:
        lam = math.asinh(tau / variance)
        return -(lam * tau - variance * (math.cosh(lam) - 1))

    lo, hi = 0.0, math.sqrt(variance) + 1.0
    while log_tail(hi) > target:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_tail(mid) > target else (lo, mid)
    return math.ceil(hi)


_QUAD_STEP = 0.005  # trapezoid step over the standard normal g (smooth integrand: exact to fp)
_QUAD_MARGIN = 12.0  # g-range beyond a * tau: truncation error 2 Phi(-12) ~ 4e-33


def _log_mgf_sq(variance: float, tau: float, theta: float) -> float:
    """Log E[exp(theta Z^2) 1{|Z| <= tau}] for Z ~ Sk(variance), bounded above.

    For |z| <= tau, exp(theta z^2) = E_g[exp(a g z)] (g standard normal, a = sqrt(2
    theta)), and the part of that expectation with |g| > G = a tau + 12 is at most
    eps = 2 Phi(-12) of it. So E[exp(theta Z^2) 1{|Z| <= tau}] <= E_g[1{|g| <= G}
    E_Z exp(a g Z)] / (1 - eps), and E_Z exp(a g Z) = exp(variance (cosh(a g) - 1)):
    a one-dimensional integral, computed by the trapezoid rule.
    """
    a = math.sqrt(2 * theta)
    limit = a * tau + _QUAD_MARGIN
    g = np.arange(-limit, limit + _QUAD_STEP, _QUAD_STEP)
    log_f = -0.5 * g * g + variance * 2.0 * np.sinh(a * g / 2) ** 2  # cosh x - 1 = 2 sinh^2(x/2)
    top = float(log_f.max())
    log_integral = top + math.log(float(np.exp(log_f - top).sum()) * _QUAD_STEP)
    eps = math.erfc(_QUAD_MARGIN / math.sqrt(2))
    return log_integral - 0.5 * math.log(2 * math.pi) - math.log1p(-eps)


def norm_sq_bound(variance: float, dim: int, probability: float) -> float:
    """A bound Q with P(||Z||^2 > Q) <= probability, Z of ``dim`` iid Sk(variance) entries.

    The squared norm of the summed noise concentrates at dim * variance with spread
    ~sqrt(2 dim) variance; this bounds its upper tail with a chi-square-style Chernoff
    bound, not dim times a per-coordinate tail. Z^2 of a Skellam variable has no MGF
    (its tail is Poisson-like), so: with probability >= 1 - probability / 2 every
    |Z_j| <= tau (``tail_bound`` at probability / (2 dim), union bound); and
    P(||Z||^2 >= x, all |Z_j| <= tau) <= exp(-theta x) M(theta)^dim with M the
    truncated MGF of ``_log_mgf_sq``, at the theta that gives the smallest x reaching
    probability / 2 (any theta gives a valid bound; the search only makes it tight).
    For near-Gaussian noise it matches the chi-square tail (Laurent and Massart 2000).
    """
    if not 0 < probability < 1:
        raise ValueError(f"tail probability must be in (0, 1), got {probability}")
    if variance <= 0:
        return 0.0
    tau = float(tail_bound(variance, probability / (2 * dim)))
    target = math.log(probability / 2)

    def x_at(log_u: float) -> float:  # u = 2 theta variance; chi-square optimum is u < 1
        theta = math.exp(log_u) / (2 * variance)
        return (dim * _log_mgf_sq(variance, tau, theta) - target) / theta

    lo, hi = math.log(1e-4), math.log(2.0)  # golden-section search on log u
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = x_at(c), x_at(d)
    for _ in range(60):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = x_at(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = x_at(d)
    return max(min(fc, fd), dim * variance)
