"""What a one-run audit leaves behind: report.json, one_run.png and a Markdown table.

The JSON holds everything needed to re-check a verdict by hand: the claim and where it
comes from, the bound with its confidence and its guess counts, every canary's score
split by its (now revealed) coin, and what the adversary saw.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dpfpl_app.audit.canaries import CanarySpec
from dpfpl_app.audit.one_run import BROADCASTS, GUESS_FRACTIONS, RELEASED, REPLAYED, ViewAudit
from dpfpl_app.config import RunConfig
from dpfpl_app.privacy.dp_channel import plan_for

SAW = {
    BROADCASTS: "every global prompt the server broadcast (its per-round checkpoints)",
    REPLAYED: "the broadcasts, minus the server noise regenerated from the public seed",
    RELEASED: "the client's exported personalised prompt",
}


def view_record(audit: ViewAudit) -> dict[str, Any]:
    b = audit.bound
    return {
        "view": audit.view,
        "adversary_saw": SAW[audit.view],
        "score": "-<released prompt - its public start, canary direction>",
        "claim": audit.claim_name,
        "claimed_epsilon": audit.claimed_epsilon,
        "lower_bound": b.epsilon,
        "confidence": b.confidence,
        "delta": b.delta,
        "guesses": b.guesses,
        "correct": b.correct,
        "guess_fraction_each_side": audit.guess_fraction,
        "separation": audit.separation,
        "ceiling_at_this_separation": audit.ceiling,
        "verdict": "VIOLATION" if audit.violation else "pass",
        "scores_in": audit.scores_in,
        "scores_out": audit.scores_out,
    }


def run_record(
    cfg: RunConfig, spec: CanarySpec, audits: Sequence[ViewAudit], *, sample_rate: float
) -> dict[str, Any]:
    """One audited run: its config, its canaries (coins revealed after the run), its views.

    ``sample_rate`` is the rate the canaries' client drew them (and its own data) at.
    """
    return {
        "method": cfg.method.value,
        "target_epsilon": cfg.epsilon,
        "delta": cfg.delta,
        "rounds": cfg.num_server_rounds,
        "clients": cfg.min_nodes,
        "canaries": {
            "count": spec.count,
            "kept": int(sum(spec.included)),
            "partition_id": spec.partition_id,
            "sample_rate": sample_rate,
            "sample_rate_is": "the client's own Poisson rate (ClientTrainer.sample_rate)",
            "rate_bound_of_the_plan": plan_for(cfg).sample_rate,
            "gradient_norm": f"{spec.scale:g} x clip-norm (every clipped piece at C)",
            "direction_seed": spec.direction_seed,
        },
        "guess_fractions": list(GUESS_FRACTIONS),
        "confidence_split": "union bound over the guess fractions",
        "violation": any(a.violation for a in audits),
        "views": [view_record(a) for a in audits],
        "run_config": cfg.to_flower(),
    }


def table(records: Sequence[dict[str, Any]]) -> str:
    """Claim against bound, one row per (run, view)."""
    rows = [
        "| method | target eps | view | claim | claimed eps | lower bound | ceiling "
        "| separation | correct / guesses | canaries | verdict |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        for v in r["views"]:
            rows.append(
                f"| {r['method']} | {r['target_epsilon']:g} | {v['view']} | {v['claim']} "
                f"| {v['claimed_epsilon']:.3f} | {v['lower_bound']:.3f} "
                f"| {v['ceiling_at_this_separation']:.3f} | {v['separation']:.2f} "
                f"| {v['correct']} / {v['guesses']} | {r['canaries']['count']} | {v['verdict']} |"
            )
    return "\n".join(rows)


def plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Score histograms of kept and left-out canaries, one panel per (run, view)."""
    panels = [(r, v) for r in records for v in r["views"]]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    for ax, (r, v) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        scores = np.concatenate([v["scores_in"], v["scores_out"]])
        bins = np.histogram_bin_edges(scores, 40)
        ax.hist(v["scores_out"], bins=bins, alpha=0.55, label="left out")
        ax.hist(v["scores_in"], bins=bins, alpha=0.55, label="kept")
        ax.set_title(
            f"{r['method']} eps {r['target_epsilon']:g}, {v['view']}:\n"
            f"lower bound {v['lower_bound']:.2f} vs claim {v['claimed_epsilon']:.2f}",
            fontsize=8,
        )
        ax.set_xlabel("adversary's score")
        ax.set_ylabel("canaries")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def write(records: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """``report.json`` and ``one_run.png`` in ``out_dir``; returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    doc = {"violation": any(r["violation"] for r in records), "runs": list(records)}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    plot(records, out_dir / "one_run.png")
    return path
