"""Paired differences between a sweep's methods, seed by seed, with 95% t intervals.

Why paired: within a seed every method sees the same partition, the same test images
and seeded noise, so the seed-to-seed spread of the partition cancels in a difference.
Two means ± std side by side hide that; the interval of the per-seed differences is
the figure that says whether one method beats another on this grid. With a few seeds the
t quantile is large (4.30 at n = 3): an interval that excludes 0 is a measured
difference, one that straddles 0 is not a finding either way.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from scipy import stats

from dpfpl_app.config import Method
from dpfpl_app.federation.results import LAST_ROUNDS
from dpfpl_app.service.sweep_grid import LABELS, MEASURES, REFERENCE_BLOCKS, Cell, SweepSpec

HEADLINE = "harmonic"
BASELINE = Method.DPFPL  # the product: every other method is compared with it
REFERENCE_LABELS = {"zeroshot": "zero-shot", "prior": "class-prior frontier"}


@dataclass(frozen=True)
class Pair:
    """``first - second`` of one measure over the seeds both have (accuracy, 0-1)."""

    first: str
    second: str
    epsilon: float
    differences: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def half_width(self) -> float:
        """Half the 95% t interval of the mean difference; NaN below two seeds."""
        n = len(self.differences)
        if n < 2:
            return math.nan
        return float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(self.differences) / n**0.5

    def text(self) -> str:
        """``+1.2 [-0.3, +2.7] (n=3)`` in accuracy points; one seed gives no interval."""
        mean, half = 100 * self.mean, 100 * self.half_width
        if math.isnan(half):
            return f"{mean:+.1f} (n=1)"
        return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] (n={len(self.differences)})"


def pairs(spec: SweepSpec, done: dict[Cell, dict[str, Any]], measure: str) -> list[Pair]:
    """For each epsilon at the main rank: DP-FPL minus every other method, then every
    method minus each reference (zero-shot, class-prior frontier) of the same seed.
    """
    key = dict(MEASURES)[measure]
    rank = spec.ranks[0]
    values: dict[tuple[Method, float], dict[int, float]] = {}
    refs: dict[str, dict[int, float]] = {}
    for cell, doc in done.items():
        if cell.rank not in (0, rank):
            continue
        value = doc["summary"].get(f"last{LAST_ROUNDS}-{key}")
        if isinstance(value, float | int):
            values.setdefault((cell.method, cell.epsilon), {})[cell.seed] = float(value)
        for block, _ in REFERENCE_BLOCKS:
            figure = (doc.get(block) or {}).get(key)
            if isinstance(figure, float | int):
                refs.setdefault(block, {}).setdefault(cell.seed, float(figure))
    out = []
    for eps in spec.epsilons:
        present = [m for m in spec.methods if (m, eps) in values]
        if BASELINE in present:
            base = values[(BASELINE, eps)]
            out += [
                _pair(LABELS[BASELINE], LABELS[m], eps, base, values[(m, eps)])
                for m in present if m is not BASELINE
            ]
        for method in present:
            out += [
                _pair(LABELS[method], REFERENCE_LABELS[block], eps, values[(method, eps)], ref)
                for block, ref in refs.items()
            ]
    return [p for p in out if p.differences]


def _pair(
    first: str, second: str, eps: float, a: dict[int, float], b: dict[int, float]
) -> Pair:
    seeds = sorted(set(a) & set(b))
    return Pair(first, second, eps, tuple(a[s] - b[s] for s in seeds))


def pairs_markdown(spec: SweepSpec, done: dict[Cell, dict[str, Any]]) -> str:
    """pairs.md: one table per epsilon, a row per comparison, a column per measure."""
    measures = [short for short, _ in MEASURES]
    by_measure = {short: pairs(spec, done, short) for short in measures}
    lines = [
        f"# Paired differences: {spec.dataset}, {spec.clients} clients, "
        f"dp-mode {spec.dp_mode.value}",
        "",
        f"Accuracy points (mean over the last {LAST_ROUNDS} rounds), first minus second, "
        "seed by seed over the seeds both have: the mean difference and its 95% t "
        "interval. An interval that excludes 0 is a measured difference; the "
        f"{HEADLINE} mean of local and neighbour accuracy is the headline.",
    ]
    for eps in spec.epsilons:
        rows = [p for p in by_measure[HEADLINE] if p.epsilon == eps]
        if not rows:
            continue
        label = "no DP" if math.isinf(eps) else f"epsilon {eps:g}"
        lines += ["", f"## {label}", "", "| first | second | " + " | ".join(measures) + " |"]
        lines.append("|---|---|" + "---|" * len(measures))
        for row in rows:
            cells = []
            for short in measures:
                match = [p for p in by_measure[short] if (p.first, p.second, p.epsilon)
                         == (row.first, row.second, row.epsilon)]
                cells.append(match[0].text() if match else "-")
            lines.append(f"| {row.first} | {row.second} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
