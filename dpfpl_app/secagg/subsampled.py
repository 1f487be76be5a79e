"""Amplification by Poisson subsampling for ANY mechanism, from its RDP at integer orders.

Why this module: opacus's subsampled-RDP bound is specific to the Gaussian mechanism.
The secure global channel releases Skellam noise (integer, quantised) jointly with the
local Gaussian carriers, so its per-step mechanism is not a Gaussian and needs a bound
that only uses the base mechanism's RDP curve.

Bound (Zhu and Wang, "Poisson Subsampled Renyi Differential Privacy", ICML 2019,
Theorem 6, the general upper bound; add/remove neighbours, as opacus). Let M have RDP
eps(l) at integer orders l >= 2, and let each record enter the sample independently
with probability q. For integer a >= 2 the subsampled mechanism has RDP at most

    1/(a-1) log[ (1-q)^(a-1) (1 + (a-1) q)
                 + C(a,2) q^2 (1-q)^(a-2) e^(eps(2))
                 + 3 sum_{l=3..a} C(a,l) q^l (1-q)^(a-l) e^((l-1) eps(l)) ].

The paper shows it is within log(3)/(a-1) and a factor 1 + O(q) of optimal; the tests
compare it with opacus's exact subsampled-Gaussian curve. Each term is summed in log
space (logsumexp), so large orders and large base RDP do not overflow.

Also used: subsampling never hurts, i.e. the subsampled mechanism's RDP is at most the
base's (joint convexity of exp((a-1) D_a) over the mixture on the sample), so the curve
returned is the minimum of the two; at q = 1 it is the base curve exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

BaseCurve = Callable[[np.ndarray], np.ndarray]


def poisson_subsampled_rdp(base: BaseCurve, orders: Sequence[int], q: float) -> np.ndarray:
    """RDP of the Poisson-subsampled mechanism at the integer ``orders`` (module docstring).

    Parameters
    ----------
    base : callable
        ``base(ls)`` returns the base mechanism's RDP at the integer orders ``ls`` (a
        float array; ``inf`` is allowed and propagates).
    orders : sequence of int
        Integer orders >= 2 (the bound is proven at integer orders only).
    q : float
        Poisson sampling probability in [0, 1].

    """
    a = np.asarray(orders)
    if a.ndim != 1 or a.size == 0 or not np.all(a == np.round(a)) or a.min() < 2:
        raise ValueError(f"orders must be integers >= 2, got {list(orders)}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling probability must be in [0, 1], got {q}")
    a = a.astype(np.int64)
    top = int(a.max())
    ls = np.arange(2, top + 1)  # every order the sums need
    eps = np.asarray(base(ls.astype(np.float64)), dtype=np.float64)
    if eps.shape != ls.shape:
        raise ValueError(f"base curve returned shape {eps.shape} for {ls.size} orders")
    base_at_orders = eps[a - 2]
    if q == 0.0:
        return np.zeros(a.size)
    if q == 1.0:
        return base_at_orders.copy()
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, top + 1)))))
    bound = np.array([_log_moment(int(order), q, eps, log_fact) / (order - 1) for order in a])
    return np.minimum(bound, base_at_orders)


def _log_moment(a: int, q: float, eps: np.ndarray, log_fact: np.ndarray) -> float:
    """Log of the bracket of the bound at integer order ``a``.

    ``eps[l - 2]`` is eps(l); ``log_fact[n]`` is log(n!).
    """
    log_q, log_1q = math.log(q), math.log1p(-q)
    ls = np.arange(2, a + 1)
    log_binom = log_fact[a] - log_fact[ls] - log_fact[a - ls]
    terms = log_binom + ls * log_q + (a - ls) * log_1q + (ls - 1) * eps[: a - 1]
    terms[1:] += math.log(3.0)  # the general theorem's factor on the l >= 3 terms
    first = (a - 1) * log_1q + math.log1p((a - 1) * q)
    return _logsumexp(np.concatenate(([first], terms)))


def _logsumexp(x: np.ndarray) -> float:
    top = float(np.max(x))
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.sum(np.exp(x - top))))
