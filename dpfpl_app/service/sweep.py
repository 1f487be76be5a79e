"""The experiment runner: a grid of methods x epsilon x seed x rank, one Flower run per cell.

Every cell is a real ``flwr run`` simulation of this app (``flwr_local.py``) writing its
own results directory; a cell whose results say "completed" is never rerun, so an
interrupted sweep resumes where it stopped. The tables follow the paper's layout (rows
dataset x epsilon, columns the methods, mean +- std over seeds of the last-10-round
mean accuracy) and are a pure function of the finished cells, so the same seeds give
byte-identical tables.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import logging
import math
import os
import queue
import shutil
import statistics
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dpfpl_app.config import DPMode, Method, RunConfig
from dpfpl_app.federation.flwr_local import LocalFlower
from dpfpl_app.federation.results import LAST_ROUNDS, RESULTS_FILE

logger = logging.getLogger(__name__)

SHARED_METHODS = (Method.PROMPTFL, Method.FEDOTP, Method.FEDPGP, Method.DPLORA, Method.DPFPL)
REFERENCE_METHODS = (Method.ZEROSHOT, Method.LOCAL)
LABELS = {
    Method.PROMPTFL: "PromptFL",
    Method.FEDOTP: "FedOTP",
    Method.FEDPGP: "FedPGP",
    Method.DPLORA: "DP-LoRA",
    Method.DPFPL: "DP-FPL",
    Method.SECFPP: "SecFPP",
    Method.LOCAL: "CoOp (local only)",
    Method.ZEROSHOT: "Zero-shot CLIP",
}
MEASURES = (("local", "local-acc"), ("neighbour", "neighbour-acc"))
SPEC_FILE = "sweep.json"


class SweepSpec(BaseModel):
    """The grid; saved beside the results so a resumed sweep is the same sweep."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "digits"
    methods: tuple[Method, ...] = SHARED_METHODS
    epsilons: tuple[float, ...] = Field((1.0, 4.0, math.inf), min_length=1)
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    ranks: tuple[int, ...] = Field((8,), min_length=1)
    ablation_epsilon: float | None = None
    references: bool = True
    dp_mode: DPMode = DPMode.PER_SAMPLE
    clients: int = Field(10, ge=1)
    overrides: dict[str, int | float | bool | str] = {}
    # run-config values of one method's cells (e.g. its tuned learning rates), over ``overrides``
    method_overrides: dict[Method, dict[str, int | float | bool | str]] = {}

    @field_validator("epsilons", mode="before")
    @classmethod
    def _null_is_no_dp(cls, values: Any) -> Any:
        """JSON has no infinity: ``sweep.json`` stores "no DP" (inf) as null."""
        if isinstance(values, (list, tuple)):
            return tuple(math.inf if v is None else v for v in values)
        return values

    @field_validator("epsilons")
    @classmethod
    def _positive(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(not e > 0 for e in values):
            raise ValueError("every epsilon must be > 0 (use inf for no differential privacy)")
        return values

    @property
    def ablation_eps(self) -> float:
        return self.ablation_epsilon if self.ablation_epsilon else self.epsilons[0]

    def cells(self) -> list[Cell]:
        """Main grid at the first rank, the rank ablation, then the reference rows."""
        cells: dict[str, Cell] = {}

        def add(method: Method, eps: float, seed: int, rank: int) -> None:
            cell = Cell(method, eps, seed, rank if method.low_rank else 0)
            cells.setdefault(cell.name, cell)

        for eps in self.epsilons:
            for method in self.methods:
                for seed in self.seeds:
                    add(method, eps, seed, self.ranks[0])
        if len(self.ranks) > 1:
            eps = self.ablation_eps
            for rank in self.ranks:
                for method in (Method.DPFPL, Method.DPLORA):
                    for seed in self.seeds:
                        add(method, eps, seed, rank)
        if self.references:
            for method in REFERENCE_METHODS:
                for seed in self.seeds:
                    add(method, math.inf, seed, 0)
        return list(cells.values())

    def run_config(self, cell: Cell, out_dir: Path) -> dict[str, int | float | bool | str]:
        """The cell's run config, validated here so a bad grid fails before any run."""
        values: dict[str, Any] = {
            **self.overrides,
            **self.method_overrides.get(cell.method, {}),
            "dataset": self.dataset,
            "method": cell.method.value,
            "seed": cell.seed,
            "min-nodes": self.clients,
            "output-dir": str(out_dir / "runs"),
            "run-name": cell.name,
            "state-dir": str(out_dir / "state"),
            "reproducible-noise": True,
        }
        if cell.rank:
            values["rank"] = cell.rank
        if math.isinf(cell.epsilon):
            values["dp-mode"] = DPMode.OFF.value
        else:
            values.update(
                {
                    "dp-mode": self.dp_mode.value,
                    "epsilon": cell.epsilon,
                }
            )
        with warnings.catch_warnings():
            # seeded noise is what makes a sweep reproducible; run_sweep says so once
            warnings.filterwarnings("ignore", message="reproducible-noise")
            return RunConfig.from_flower(values).to_flower()


@dataclass(frozen=True)
class Cell:
    method: Method
    epsilon: float
    seed: int
    rank: int  # 0: the method has no rank

    @property
    def name(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        rank = f"-r{self.rank}" if self.rank else ""
        return f"{self.method.value}-eps{eps}{rank}-s{self.seed}"


def cell_result(out_dir: Path, cell: Cell, clients: int) -> dict[str, Any] | None:
    """The cell's results if its run is complete (``incomplete_reason``), else None."""
    path = out_dir / "runs" / cell.name / RESULTS_FILE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return None if incomplete_reason(doc, clients) else doc


def incomplete_reason(doc: dict[str, Any], clients: int) -> str | None:
    """Why a run does not count as a sweep cell, or None when it does.

    A cell counts only if it completed every round with all ``clients`` trained and
    evaluated and none refused: a round with fewer replies averages other clients, and
    the last-10 mean would silently slide over rounds without a valid reply.
    """
    if doc.get("status") != "completed":
        return f"status {doc.get('status')!r}: {doc.get('reason', 'no reason recorded')}"
    rounds, planned = doc.get("rounds", []), doc.get("config", {}).get("num-server-rounds")
    if [r.get("round") for r in rounds] != list(range(1, len(rounds) + 1)) or (
        len(rounds) != planned
    ):
        return f"{len(rounds)} rounds recorded, {planned} planned"
    for row in rounds:
        counts = {key: row.get(key) for key in ("accepted", "rejected", "eval-accepted",
                                                 "eval-rejected")}
        if counts != {"accepted": clients, "rejected": 0, "eval-accepted": clients,
                      "eval-rejected": 0}:
            return f"round {row['round']}: {counts} (every one of {clients} clients expected)"
        local = [k for k in row if k.startswith("local-acc/node-")]
        if len(local) != clients:
            return f"round {row['round']}: local accuracy of {len(local)} of {clients} clients"
    return None


def run_sweep(
    spec: SweepSpec,
    out_dir: Path,
    *,
    app_dir: Path,
    timeout_s: float = 3600.0,
    parallel: int = 1,
) -> list[Cell]:
    """Run every unfinished cell, ``parallel`` at a time; returns the cells that failed.

    Both paths are made absolute first: the runs execute in a SuperLink whose working
    directory is ``app_dir``, so a relative ``output-dir`` would land (and be looked
    for) somewhere else, and a relative ``app_dir`` would be resolved twice. Cells run
    side by side each get their own local SuperLink (``LocalFlower``) and an equal share
    of the cores for torch's threads.
    A cell's results do not depend on what runs beside it: its noise and data are
    seeded by the cell alone (float sums do depend on torch's thread count).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1 cells at a time, got {parallel}")
    out_dir, app_dir = Path(out_dir).resolve(), Path(app_dir).resolve()
    cells = spec.cells()
    configs = {c.name: spec.run_config(c, out_dir) for c in cells}  # a bad grid stops here
    _claim(out_dir, spec)
    todo = [c for c in cells if cell_result(out_dir, c, spec.clients) is None]
    logger.info(
        "sweep %s: %d cells, %d done, %d to run, %d at a time (DP noise seeded for "
        "reproducibility: experiments only)",
        out_dir, len(cells), len(cells) - len(todo), len(todo), parallel,
    )
    pending: queue.SimpleQueue[Cell] = queue.SimpleQueue()
    for cell in todo:
        pending.put(cell)
    progress = _Progress(len(todo))
    # side by side, each run's torch gets its share of the cores (see LocalFlower)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None

    def serve(slot: int) -> list[Cell]:
        failed = []
        home = out_dir / (".flwr" if slot == 0 else f".flwr-{slot}")
        with LocalFlower(app_dir, home, threads=threads) as flower:
            while True:
                try:
                    cell = pending.get_nowait()
                except queue.Empty:
                    return failed
                if not _run_cell(flower, cell, configs[cell.name], spec, out_dir,
                                 timeout_s, progress):
                    failed.append(cell)

    workers = min(parallel, len(todo)) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        failed = [c for part in pool.map(serve, range(workers)) for c in part]
    write_tables(spec, out_dir)
    order = {c.name: i for i, c in enumerate(todo)}
    return sorted(failed, key=lambda c: order[c.name])


class _Progress:
    """Numbers the cells as they start and estimates the time left (thread-safe)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started_at = time.monotonic()
        self.started = self.finished = 0
        self._lock = threading.Lock()

    def start(self) -> int:
        with self._lock:
            self.started += 1
            return self.started

    def finish(self) -> float:
        """Minutes left at the pace so far."""
        with self._lock:
            self.finished += 1
            per_cell = (time.monotonic() - self.started_at) / self.finished
            return per_cell * (self.total - self.finished) / 60


def _run_cell(
    flower: LocalFlower,
    cell: Cell,
    config: dict[str, int | float | bool | str],
    spec: SweepSpec,
    out_dir: Path,
    timeout_s: float,
    progress: _Progress,
) -> bool:
    """One cell's Flower run; True when it counts."""
    # a failed earlier attempt left a run directory and private state behind:
    # both belong to that attempt's run id and would be refused by the clients
    shutil.rmtree(out_dir / "runs" / cell.name, ignore_errors=True)
    shutil.rmtree(out_dir / "state" / cell.name, ignore_errors=True)
    i, n, t0 = progress.start(), progress.total, time.monotonic()
    logger.info("[%d/%d] %s ...", i, n, cell.name)
    try:
        run_id, status = flower.run(config, num_supernodes=spec.clients, timeout_s=timeout_s)
    except RuntimeError as err:  # refused or unreadable: this cell fails, not the sweep
        run_id, status = -1, str(err)
    doc = cell_result(out_dir, cell, spec.clients)
    left = progress.finish()
    if doc is None:
        logger.error("[%d/%d] %s: run %d ended %s; the cell does not count: %s",
                     i, n, cell.name, run_id, status,
                     cell_failure(out_dir, cell, spec.clients))
        return False
    s = doc["summary"]
    logger.info(
        "[%d/%d] %s: local %.3f neighbour %.3f in %.0f s (about %.0f min left)",
        i, n, cell.name, s.get(f"last{LAST_ROUNDS}-local-acc", math.nan),
        s.get(f"last{LAST_ROUNDS}-neighbour-acc", math.nan), time.monotonic() - t0, left,
    )
    return True


def cell_failure(out_dir: Path, cell: Cell, clients: int) -> str:
    """Why a cell has no counted result (for the log and the table's failed list)."""
    path = out_dir / "runs" / cell.name / RESULTS_FILE
    if not path.is_file():
        return f"no {RESULTS_FILE} (the run never started or wrote nothing)"
    return incomplete_reason(json.loads(path.read_text()), clients) or "complete"


def _claim(out_dir: Path, spec: SweepSpec) -> None:
    """Refuse to mix two different grids' cells in one directory.

    The saved grid is compared as a grid, not as text, so a sweep written before a new
    field with a default was added resumes as long as its grid is the same.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SPEC_FILE
    if path.is_file():
        try:
            held: SweepSpec | None = SweepSpec.model_validate_json(path.read_text())
        except ValidationError:
            held = None
        if held != spec:
            raise ValueError(
                f"{out_dir} holds another sweep ({path}); resume it with the same "
                "arguments, or choose another --out"
            )
    path.write_text(spec.model_dump_json(indent=2))


@dataclass(frozen=True)
class Aggregate:
    method: Method
    epsilon: float
    rank: int
    seeds: int  # complete cells averaged
    planned: int  # seeds the sweep asked for
    means: dict[str, float]
    stds: dict[str, float]
    eps_spent: float  # the largest composed epsilon over the seeds


def aggregate(spec: SweepSpec, out_dir: Path) -> list[Aggregate]:
    """Mean and std over seeds of each (method, epsilon, rank) with complete cells."""
    groups: dict[tuple[Method, float, int], list[dict[str, Any]]] = {}
    for cell in spec.cells():
        doc = cell_result(out_dir, cell, spec.clients)
        if doc is not None:
            groups.setdefault((cell.method, cell.epsilon, cell.rank), []).append(doc["summary"])
    rows = []
    for (method, eps, rank), summaries in groups.items():
        means, stds = {}, {}
        for short, key in MEASURES:
            values = [s[f"last{LAST_ROUNDS}-{key}"] for s in summaries]
            means[short] = statistics.fmean(values)
            stds[short] = statistics.stdev(values) if len(values) > 1 else 0.0
        spent = max(s.get("final-epsilon", 0.0) for s in summaries)
        planned = len(spec.seeds)
        rows.append(Aggregate(method, eps, rank, len(summaries), planned, means, stds, spent))
    return rows


def _eps_label(eps: float) -> str:
    return "no DP" if math.isinf(eps) else f"{eps:g}"


def _cell(agg: Aggregate | None, measure: str) -> str:
    """Mean ± std with the seed count; one seed has no std, and missing seeds show."""
    if agg is None:
        return "-"
    mean = f"{100 * agg.means[measure]:.1f}"
    spread = f" ± {100 * agg.stds[measure]:.1f}" if agg.seeds > 1 else ""
    count = f"n={agg.seeds}" + (f" of {agg.planned}" if agg.seeds < agg.planned else "")
    return f"{mean}{spread} ({count})"


def write_tables(spec: SweepSpec, out_dir: Path) -> None:
    """table.md, table.csv and the plots, from the finished cells only."""
    rows = aggregate(spec, out_dir)
    failed = {
        c.name: cell_failure(out_dir, c, spec.clients)
        for c in spec.cells()
        if cell_result(out_dir, c, spec.clients) is None
    }
    (out_dir / "table.md").write_text(markdown_table(spec, rows, failed))
    (out_dir / "table.csv").write_text(csv_table(spec, rows))
    try:
        plot_sweep(spec, rows, out_dir)
    except Exception as err:  # noqa: BLE001 - a plot must never lose the tables
        logger.warning("could not draw the sweep plots: %s", err)


def markdown_table(
    spec: SweepSpec, rows: Iterable[Aggregate], failed: dict[str, str] | None = None
) -> str:
    """The paper-style tables; ``failed`` (cell name -> reason) lists cells left out."""
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
    for short, title in (("local", "Local accuracy"), ("neighbour", "Neighbour accuracy")):
        header = ["dataset", "epsilon", *(LABELS[m] for m in spec.methods)]
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for eps in spec.epsilons:
            cells = [_cell(find(m, eps), short) for m in spec.methods]
            lines.append(f"| {spec.dataset} | {_eps_label(eps)} | " + " | ".join(cells) + " |")
    if spec.references:
        lines += ["", "## Reference rows (no training of shared prompts, no DP)", ""]
        lines += ["| method | local | neighbour |", "|---|---|---|"]
        for method in REFERENCE_METHODS:
            agg = find(method, math.inf)
            local, neighbour = _cell(agg, "local"), _cell(agg, "neighbour")
            lines.append(f"| {LABELS[method]} | {local} | {neighbour} |")
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


def csv_table(spec: SweepSpec, rows: Iterable[Aggregate]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "dataset", "method", "epsilon", "rank", "seeds", "seeds_planned", "local_mean",
            "local_std",
            "neighbour_mean", "neighbour_std", "epsilon_spent",
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
    _two_panels(
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
    _two_panels(
        out_dir / "rank_ablation.png", by_rank, f"{spec.dataset}, epsilon {_eps_label(eps)}:",
        "rank",
    )


def _two_panels(
    path: Path,
    series: dict[str, list[tuple[float, Aggregate]]],
    title: str,
    xlabel: str,
    log_ticks: tuple[list[float], list[str]] | None = None,
) -> None:
    """Local and neighbour accuracy side by side, one line (mean +- std) per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, short in zip(axes, ("local", "neighbour"), strict=True):
        for label, points in series.items():
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
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
