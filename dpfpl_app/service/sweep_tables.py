"""A sweep's tables and plots: a pure function of its finished cells.

The layout is the paper's (rows dataset x epsilon, columns the methods, mean +- std over
seeds of the last-10-round mean accuracy), so the same seeds give byte-identical tables.
Beside local and neighbour accuracy come their harmonic mean (the headline: a class prior
cannot win it) and all-class accuracy, and the references every learned prompt must beat:
zero-shot and the class-prior frontier (``federation.results.REFERENCES``), which depend
on the seed's partition only. Each cell's results are read once; a cell that does not
count is listed with the reason.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfpl_app.config import Method
from dpfpl_app.federation.results import LAST_ROUNDS
from dpfpl_app.service.sweep_grid import (
    LABELS,
    MEASURES,
    REFERENCE_BLOCKS,
    REFERENCE_METHODS,
    SHARED_METHODS,
    Cell,
    SweepSpec,
    read_cell,
)
from dpfpl_app.service.sweep_pairs import pairs_markdown

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Aggregate:
    """One entry of the tables: a (method, epsilon, rank) over the seeds that count."""

    method: Method
    epsilon: float
    rank: int
    seeds: int  # complete cells averaged
    planned: int  # seeds the sweep asked for
    means: dict[str, float]
    stds: dict[str, float]
    eps_spent: float  # the largest composed epsilon over the seeds


def aggregate(spec: SweepSpec, done: dict[Cell, dict[str, Any]]) -> list[Aggregate]:
    """Mean and std over seeds of each (method, epsilon, rank), from the cells that count."""
    groups: dict[tuple[Method, float, int], list[dict[str, Any]]] = {}
    for cell, doc in done.items():
        groups.setdefault((cell.method, cell.epsilon, cell.rank), []).append(doc["summary"])
    rows = []
    for (method, eps, rank), summaries in groups.items():
        means, stds = {}, {}
        for short, key in MEASURES:
            values = [s.get(f"last{LAST_ROUNDS}-{key}") for s in summaries]
            if all(isinstance(v, float | int) for v in values):  # else: recorded before it
                means[short], stds[short] = _mean_std(values)
        spent = max(s.get("final-epsilon", 0.0) for s in summaries)
        planned = len(spec.seeds)
        rows.append(Aggregate(method, eps, rank, len(summaries), planned, means, stds, spent))
    return rows


def references(done: dict[Cell, dict[str, Any]]) -> dict[str, tuple[dict, dict, int]]:
    """Each reference block's (means, stds, seeds) over seeds, per measure.

    A reference depends on the seed's partition only, so each seed counts once (its
    first cell by name that carries the block), whatever the method and epsilon.
    """
    out = {}
    for block, _ in REFERENCE_BLOCKS:
        per_seed: dict[int, dict[str, float]] = {}
        for cell in sorted(done, key=lambda c: c.name):
            if isinstance(done[cell].get(block), dict):
                per_seed.setdefault(cell.seed, done[cell][block])
        means, stds = {}, {}
        for short, key in MEASURES:
            values = [figures.get(key) for figures in per_seed.values()]
            if values and all(isinstance(v, float | int) for v in values):
                means[short], stds[short] = _mean_std(values)
        if means:
            out[block] = (means, stds, len(per_seed))
    return out


def _mean_std(values: list[Any]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _eps_label(eps: float) -> str:
    return "no DP" if math.isinf(eps) else f"{eps:g}"


def _cell(agg: Aggregate | None, measure: str) -> str:
    """Mean ± std with the seed count; one seed has no std, and missing seeds show."""
    if agg is None or measure not in agg.means:
        return "-"
    mean = f"{100 * agg.means[measure]:.1f}"
    spread = f" ± {100 * agg.stds[measure]:.1f}" if agg.seeds > 1 else ""
    count = f"n={agg.seeds}" + (f" of {agg.planned}" if agg.seeds < agg.planned else "")
    return f"{mean}{spread} ({count})"


def write_tables(spec: SweepSpec, out_dir: Path) -> None:
    """table.md, pairs.md (``sweep_pairs``), table.csv and the plots, from the finished
    cells only.
    """
    done, failed = {}, {}
    for cell in spec.cells():  # each results.json read once
        doc, reason = read_cell(out_dir, cell, spec.clients)
        if doc is None:
            failed[cell.name] = reason
        else:
            done[cell] = doc
    rows = aggregate(spec, done)
    (out_dir / "table.md").write_text(markdown_table(spec, rows, failed, references(done)))
    (out_dir / "pairs.md").write_text(pairs_markdown(spec, done))
    (out_dir / "table.csv").write_text(csv_table(spec, rows))
    try:
        plot_sweep(spec, rows, out_dir)
    except Exception as err:  # noqa: BLE001 - a plot must never lose the tables
        logger.warning("could not draw the sweep plots: %s", err)


def markdown_table(
    spec: SweepSpec,
    rows: Iterable[Aggregate],
    failed: dict[str, str] | None = None,
    refs: dict[str, tuple[dict, dict, int]] | None = None,
) -> str:
    """The paper-style tables; ``failed`` (cell name -> reason) lists cells left out,
    ``refs`` (``references``) the zero-shot and class-prior lines.
    """
    index = {(a.method, a.epsilon, a.rank): a for a in rows}
    rank = spec.ranks[0]

    def find(method: Method, eps: float) -> Aggregate | None:
        return index.get((method, eps, rank if method.low_rank else 0))

    lines = [
        f"# Sweep: {spec.dataset}, {spec.clients} clients, dp-mode {spec.dp_mode.value}",
        "",
        f"Accuracy (%) over all classes, mean ± std over seeds {list(spec.seeds)} of the "
        f"mean over the last {LAST_ROUNDS} rounds; rank {rank}; epsilon of both channels composed.",
        "(n=k: complete seeds averaged; a cell counts only if every round had all "
        f"{spec.clients} clients trained and evaluated.)",
    ]
    if spec.overrides:
        given = ", ".join(f"{k}={v}" for k, v in spec.overrides.items())
        lines.append(f"Run-config overrides: {given}.")
    for method, values in spec.method_overrides.items():
        given = ", ".join(f"{k}={v}" for k, v in values.items())
        lines.append(f"{LABELS[method]} only: {given}.")
    titles = {
        "harmonic": "Harmonic mean of local and neighbour accuracy (headline; mean over clients)",
        "local": "Local accuracy",
        "neighbour": "Neighbour accuracy",
        "all": "All-class accuracy in the client's domain",
    }
    for short, title in titles.items():
        header = ["dataset", "epsilon", *(LABELS[m] for m in spec.methods)]
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for eps in spec.epsilons:
            cells = [_cell(find(m, eps), short) for m in spec.methods]
            lines.append(f"| {spec.dataset} | {_eps_label(eps)} | " + " | ".join(cells) + " |")
    if spec.references:
        lines += ["", "## Reference rows (no training of shared prompts, no DP)", ""]
        lines += ["| method | harmonic | local | neighbour | all-class |", "|---|---|---|---|---|"]
        for method in REFERENCE_METHODS:
            agg = find(method, math.inf)
            lines.append(f"| {LABELS[method]} | " + " | ".join(
                _cell(agg, short) for short in ("harmonic", "local", "neighbour", "all")
            ) + " |")
    if refs:
        lines += ["", "## References on the images the cells evaluate on (per seed's partition)",
                  ""]
        lines += ["| reference | harmonic | local | neighbour | all-class |",
                  "|---|---|---|---|---|"]
        for block, label in REFERENCE_BLOCKS:
            if block in refs:
                means, stds, seeds = refs[block]
                lines.append(f"| {label} | " + " | ".join(
                    _reference_cell(means, stds, seeds, short)
                    for short in ("harmonic", "local", "neighbour", "all")
                ) + " |")
    if len(spec.ranks) > 1:
        eps = spec.ablation_eps
        lines += ["", f"## Rank ablation at epsilon {_eps_label(eps)} (local / neighbour)", ""]
        lines += ["| rank | DP-FPL (with residual) | DP-LoRA (without) |", "|---|---|---|"]
        for r in sorted(spec.ranks):
            both = [index.get((m, eps, r)) for m in (Method.DPFPL, Method.DPLORA)]
            lines.append(
                f"| {r} | "
                + " | ".join(f"{_cell(a, 'local')} / {_cell(a, 'neighbour')}" for a in both)
                + " |"
            )
    if failed:
        lines += ["", "## Cells left out (failed or incomplete)", ""]
        lines += [f"- {name}: {reason}" for name, reason in sorted(failed.items())]
    return "\n".join(lines) + "\n"


def _reference_cell(means: dict, stds: dict, seeds: int, measure: str) -> str:
    if measure not in means:
        return "-"
    spread = f" ± {100 * stds[measure]:.1f}" if seeds > 1 else ""
    return f"{100 * means[measure]:.1f}{spread} (n={seeds})"


def csv_table(spec: SweepSpec, rows: Iterable[Aggregate]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "dataset", "method", "epsilon", "rank", "seeds", "seeds_planned", "local_mean",
            "local_std",
            "neighbour_mean", "neighbour_std", "epsilon_spent", "harmonic_mean",
            "harmonic_std", "all_mean", "all_std",
        ]
    )
    order = {m: i for i, m in enumerate((*SHARED_METHODS, Method.SECFPP, *REFERENCE_METHODS))}

    def spent(a: Aggregate) -> list[str]:
        if math.isinf(a.epsilon):  # no DP: there is no budget to report
            return [""]
        return [f"{a.eps_spent:.4f}"]

    for a in sorted(rows, key=lambda a: (a.epsilon, order[a.method], a.rank)):
        writer.writerow(
            [
                spec.dataset, a.method.value, _eps_label(a.epsilon), a.rank, a.seeds, a.planned,
                f"{a.means['local']:.4f}", f"{a.stds['local']:.4f}",
                f"{a.means['neighbour']:.4f}", f"{a.stds['neighbour']:.4f}",
                *spent(a),
                *(f"{stat[short]:.4f}" if short in stat else ""
                  for short in ("harmonic", "all") for stat in (a.means, a.stds)),
            ]
        )
    return buffer.getvalue()


def plot_sweep(spec: SweepSpec, rows: list[Aggregate], out_dir: Path) -> None:
    """accuracy_vs_epsilon.png and (with several ranks) rank_ablation.png."""
    index = {(a.method, a.epsilon, a.rank): a for a in rows}
    finite = sorted(e for e in spec.epsilons if not math.isinf(e))
    no_dp_x = finite[-1] * 4 if finite else 1.0  # where "no DP" sits on the log axis
    by_method = {}
    for method in spec.methods:
        rank = spec.ranks[0] if method.low_rank else 0
        by_method[LABELS[method]] = [
            (no_dp_x if math.isinf(e) else e, index[(method, e, rank)])
            for e in sorted(spec.epsilons)
            if (method, e, rank) in index
        ]
    ticks = [*finite, no_dp_x] if len(finite) < len(set(spec.epsilons)) else finite
    labels = [*(f"{e:g}" for e in finite), "no DP"][: len(ticks)]
    _panels(
        out_dir / "accuracy_vs_epsilon.png", by_method, f"{spec.dataset}:",
        "epsilon (both channels composed)", log_ticks=(ticks, labels),
    )
    if len(spec.ranks) < 2:
        return
    eps = spec.ablation_eps
    by_rank = {
        label: [(r, index[(m, eps, r)]) for r in sorted(spec.ranks) if (m, eps, r) in index]
        for m, label in ((Method.DPFPL, "with residual (DP-FPL)"),
                         (Method.DPLORA, "without residual (DP-LoRA)"))
    }
    _panels(
        out_dir / "rank_ablation.png", by_rank, f"{spec.dataset}, epsilon {_eps_label(eps)}:",
        "rank",
    )


def _panels(
    path: Path,
    series: dict[str, list[tuple[float, Aggregate]]],
    title: str,
    xlabel: str,
    log_ticks: tuple[list[float], list[str]] | None = None,
) -> None:
    """Harmonic mean, local and neighbour accuracy side by side, one line (mean +- std)
    per series (a run recorded before the harmonic mean existed leaves its panel empty).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("harmonic", "local", "neighbour")
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4), sharey=True)
    for ax, short in zip(axes, panels, strict=True):
        for label, all_points in series.items():
            points = [(x, a) for x, a in all_points if short in a.means]
            if points:
                ax.errorbar(
                    [x for x, _ in points], [100 * a.means[short] for _, a in points],
                    yerr=[100 * a.stds[short] for _, a in points], marker="o", capsize=3,
                    label=label,
                )
        if log_ticks is not None:
            ax.set_xscale("log")
            ax.set_xticks(*log_ticks)
        ax.set_xlabel(xlabel)
        ax.set_title(f"{title} {short} accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
