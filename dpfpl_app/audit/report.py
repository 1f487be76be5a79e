"""What an audit leaves behind: report.json, audit.png and a short table.

The JSON carries everything needed to re-check the verdict by hand: the claim and where
it comes from, the bound with its confidence, the error counts and their upper bounds,
the number of trials, and what the adversary saw.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dpfpl_app.audit.white_box import WhiteBoxAudit


def audit_record(audit: WhiteBoxAudit, *, accountant: str) -> dict[str, Any]:
    """One audit as a JSON-ready dict (no raw scores: they are in the plot)."""
    bound = audit.bound
    return {
        "channel": audit.game.channel.value,
        "noise_multiplier": audit.game.noise_multiplier,
        "delta": bound.delta,
        "claimed_epsilon": audit.claimed_epsilon,
        "claim": (
            "secure channel's Skellam accounting, one released sum, sample rate 1"
            if audit.game.survivor_ratio is not None
            else f"{accountant} accountant, one Gaussian release, sample rate 1"
        ),
        "exact_epsilon": audit.exact_epsilon,
        "lower_bound": bound.epsilon,
        "confidence": bound.confidence,
        "lower_bound_over_claim": audit.tightness,
        "verdict": "VIOLATION" if audit.violation else "pass",
        "epsilon_verdict": "VIOLATION" if audit.epsilon_violation else "pass",
        "noise": {
            "claimed_std": audit.noise.claimed_std,
            "measured_std": audit.noise.measured_std,
            "interval": [audit.noise.low, audit.noise.high],
            "degrees_of_freedom": audit.noise.degrees_of_freedom,
            "false_alarm": audit.noise.false_alarm,
            "verdict": "pass" if audit.noise.ok else "VIOLATION",
        },
        "shift": {
            "claimed_sensitivity": audit.shift.claimed,
            "measured": audit.shift.measured,
            "tolerance": audit.shift.tolerance,
            "false_alarm": audit.shift.false_alarm,
            "verdict": "pass" if audit.shift.ok else "VIOLATION",
        },
        "trials": {
            "with_canary": len(audit.scores_with),
            "without_canary": len(audit.scores_without),
        },
        "test": {
            "rule": "canary present when score > threshold (threshold chosen on half the trials)",
            "threshold": bound.threshold,
            "evaluation_trials_with": bound.trials_with,
            "evaluation_trials_without": bound.trials_without,
            "false_positives": bound.false_positives,
            "false_negatives": bound.false_negatives,
            "fpr_upper": bound.fpr_upper,
            "fnr_upper": bound.fnr_upper,
        },
        "adversary": {"saw": audit.game.observed, "score": audit.adversary},
    }


def summary_table(audits: Sequence[WhiteBoxAudit]) -> str:
    """A Markdown table: claim against lower bound, one row per audit."""
    rows = [
        "| channel | z | delta | claimed eps | exact eps | lower bound | bound/claim "
        "| noise std: measured / claimed | shift: measured / claimed | trials | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in audits:
        rows.append(
            f"| {a.game.channel.value} | {a.game.noise_multiplier:g} | {a.bound.delta:g} "
            f"| {a.claimed_epsilon:.3f} | {a.exact_epsilon:.3f} | {a.bound.epsilon:.3f} "
            f"| {a.tightness:.2f} "
            f"| {a.noise.measured_std:.4g} / {a.noise.claimed_std:.4g}"
            f"{'' if a.noise.ok else ' (!)'} "
            f"| {a.shift.measured:.4g} / {a.shift.claimed:.4g}{'' if a.shift.ok else ' (!)'} "
            f"| {len(a.scores_with)} + {len(a.scores_without)} "
            f"| {'VIOLATION' if a.violation else 'pass'} |"
        )
    return "\n".join(rows)


def plot_audits(audits: Sequence[WhiteBoxAudit], path: Path) -> None:
    """Score histograms with and without the canary, one panel per audit."""
    fig = Figure(figsize=(5.0 * len(audits), 3.6), layout="constrained")
    for ax, a in zip(fig.subplots(1, len(audits), squeeze=False)[0], audits, strict=True):
        # shared bins: a replayed (noise-free) score set has no spread of its own
        bins = np.histogram_bin_edges(np.concatenate([a.scores_with, a.scores_without]), 80)
        ax.hist(a.scores_without, bins=bins, alpha=0.55, label="without canary")
        ax.hist(a.scores_with, bins=bins, alpha=0.55, label="with canary")
        ax.axvline(a.bound.threshold, color="black", lw=1, ls="--", label="threshold")
        ax.set_title(
            f"{a.game.channel.value}, z={a.game.noise_multiplier:g}: "
            f"eps_lb {a.bound.epsilon:.2f} vs claim {a.claimed_epsilon:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("adversary's score")
        ax.set_ylabel("trials (log scale: the bound is decided in the tails)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def write_report(
    audits: Sequence[WhiteBoxAudit],
    out_dir: Path,
    *,
    accountant: str,
    settings: dict[str, Any],
) -> Path:
    """Write ``report.json`` and ``audit.png`` into ``out_dir``; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": settings,
        "violation": any(a.violation for a in audits),
        "audits": [audit_record(a, accountant=accountant) for a in audits],
    }
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot_audits(audits, out_dir / "audit.png")
    return path
