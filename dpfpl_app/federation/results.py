"""Results a person can read and plot: results.json, metrics.csv and PNG plots per run.

``results.json`` is rewritten after every round (atomically), so a crashed or stopped
run still leaves the rounds it finished; ``status`` says whether it completed, and a
failed run says why (``reason``), whatever stopped it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpfpl_app.federation.node_paths import prompt_path_on_node

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CSV_FILE = "metrics.csv"
LAST_ROUNDS = 10  # the paper reports the mean over the last 10 rounds
PARTITION_PREFIX = "partition-id/node-"
"""Round metrics under this prefix build the node map, not a metrics.csv column."""
SECURE = "secure"  # a run config's resolved aggregation whose evaluation is a secure sum
NODES_NOTE = (
    "prompt-file is a path on that node's host; a SuperNode started with its own "
    "--node-config state-dir keeps it under that directory instead"
)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("dpfpl", "flwr", "torch", "transformers", "opacus", "flwr-datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunRecorder:
    """Collects per-round metrics and writes the run's files."""

    def __init__(
        self,
        out_dir: Path,
        *,
        config: dict[str, Any],
        notes: dict[str, Any],
        run_id: int | None = None,
        rounds: list[dict[str, Any]] | None = None,
    ) -> None:
        # absolute: a relative output-dir resolves against the ServerApp's cwd, which is
        # where the SuperLink was started, not where the user typed `flwr run`
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.run_id = run_id
        self.doc: dict[str, Any] = {
            "status": "running",
            "run-id": run_id,
            "results-dir": str(self.out_dir),
            "config": config,
            "notes": notes,
            "versions": library_versions(),
            "nodes": {},
            "rounds": list(rounds or []),
            "summary": {},
        }
        self._write()

    def record(self, server_round: int, metrics: dict[str, Any]) -> None:
        row = {"round": server_round, "elapsed-s": round(time.time() - self.started, 2)}
        for key, value in metrics.items():
            if key.startswith(PARTITION_PREFIX):
                self._map_node(key.removeprefix(PARTITION_PREFIX), int(value))
            else:
                row[key] = _plain(value)
        self.doc["rounds"].append(row)
        self._write()

    def keep_rounds(self, *, up_to: int) -> None:
        """Drop recorded rounds after ``up_to`` (a resumed run redoes them)."""
        self.doc["rounds"] = [r for r in self.doc["rounds"] if int(r["round"]) <= up_to]
        self._write()

    def _map_node(self, node_id: str, partition_id: int) -> None:
        """Node id -> partition and where that node keeps its exported prompt."""
        entry: dict[str, Any] = {"partition-id": partition_id}
        if self.run_id is not None:
            config = self.doc["config"]
            entry["prompt-file"] = prompt_path_on_node(
                str(config.get("state-dir", "")), str(config.get("run-name", "")),
                self.run_id, partition_id,
            )
            self.doc["notes"].setdefault("nodes", NODES_NOTE)
        self.doc["nodes"][node_id] = entry

    @contextlib.contextmanager
    def failure_recorded(self) -> Iterator[None]:
        """Mark the run failed, with the reason, if the body raises (then re-raise).

        Without it an exception (a missing model, an unreachable hub, a crash mid-run)
        would leave results.json saying "running" for good.
        """
        try:
            yield
        except BaseException as err:
            self.finish(status="failed", reason=failure_reason(err))
            raise

    def finish(
        self, *, status: str, reason: str | None = None, extra: dict[str, Any] | None = None
    ) -> Path:
        self.doc["status"] = status
        if reason is not None:
            self.doc["reason"] = reason
        self.doc["summary"] = summarise(self.doc["rounds"])
        self.doc["summary"].update(extra or {})
        for name, prefix in REFERENCES.items():
            figures = reference(self.doc["rounds"], prefix)
            if figures:
                self.doc[name] = figures
        self._write()
        self._write_csv()
        try:
            plot_run(self.doc, self.out_dir)
        except Exception as err:  # noqa: BLE001 - a plot must never lose the results
            logger.warning("could not draw plots: %s", err)
        return self.out_dir / RESULTS_FILE

    def _write(self) -> None:
        path = self.out_dir / RESULTS_FILE
        tmp = path.with_name(f".{RESULTS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(self.doc, indent=2, allow_nan=True))
        os.replace(tmp, path)

    def _write_csv(self) -> None:
        rows = self.doc["rounds"]
        keys: list[str] = []
        for row in rows:
            keys.extend(k for k in row if k not in keys)
        with open(self.out_dir / CSV_FILE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


def failure_reason(err: BaseException) -> str:
    """What stopped a run, in one line: the exception's type and message."""
    text = str(err).strip() or "no message"
    return f"{type(err).__name__}: {text}"


def run_failed(doc: dict[str, Any]) -> bool:
    return doc.get("status") == "failed"


def _plain(value: Any) -> Any:
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    )


ACCURACIES = ("local-acc", "neighbour-acc", "harmonic-acc", "all-acc")
"""A run's accuracies: local, neighbour, their harmonic mean (the headline: the mean
over clients of each client's, ``method.accuracy``) and all-class accuracy."""
REFERENCES = {"zeroshot": "zeroshot-", "prior": "prior-"}
"""results.json's reference blocks beside the run's accuracies -> their round-key prefix:
the zero-shot template and the class-prior frontier (zero-shot with the best own-class
bias per client, ``method.class_prior``): the lines a learned prompt must beat."""


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and last-10-round means of the accuracies; the final epsilons."""
    summary: dict[str, Any] = {"rounds": len(rounds)}
    for key in ACCURACIES:
        values = [r[key] for r in rounds if isinstance(r.get(key), float) and r[key] == r[key]]
        if values:
            summary[f"final-{key}"] = values[-1]
            tail = values[-LAST_ROUNDS:]
            summary[f"last{LAST_ROUNDS}-{key}"] = sum(tail) / len(tail)
    for key in ("epsilon",):
        values = [r[key] for r in rounds if key in r]
        if values:
            summary[f"final-{key}"] = values[-1]
    return summary


def reference(rounds: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """A reference's accuracies (round keys ``<prefix>local-acc``, ...) under the run's
    names (``local-acc``, ...): the line to beat.

    Clients report them with every evaluation (the same test images every round, so
    they are constant up to which clients answered); the mean over rounds is kept.
    """
    figures = {}
    for key in ACCURACIES:
        values = [r[f"{prefix}{key}"] for r in rounds if _finite(r.get(f"{prefix}{key}"))]
        if values:
            figures[key] = sum(values) / len(values)
    return figures


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def load_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {run_dir}: is it a run's output directory?")
    return json.loads(path.read_text())


def accuracy_meaning(doc: dict[str, Any]) -> str:
    """What a run's ``local-acc`` / ``neighbour-acc`` are: the means differ by mode.

    A secure run's server learns only summed counts (``secure_evaluation``), so its
    accuracies are federation-wide (example-weighted); a plain run's are the mean over
    clients (the paper's figure), with the example-weighted ones beside them.
    """
    if doc.get("config", {}).get("aggregation") == SECURE:
        return "federation-wide: correct / examples"
    return "mean over clients"


def summary_table(doc: dict[str, Any]) -> str:
    """A plain-text table of the run: one line per round and the summary."""
    cols = ["round", *ACCURACIES, "epsilon"]
    if any("train-loss" in row for row in doc["rounds"]):  # recorded only without DP
        cols.insert(1, "train-loss")
    lines = ["  ".join(f"{c:>13}" for c in cols)]
    for row in doc["rounds"]:
        cells = [row.get(c, "") for c in cols]
        lines.append(
            "  ".join(f"{v:>13.4g}" if isinstance(v, float) else f"{v!s:>13}" for v in cells)
        )
    config = doc.get("config", {})
    lines.append(
        f"status: {doc['status']}  method: {config.get('method')}  dp-mode: {config.get('dp-mode')}"
        f"  accuracy: {accuracy_meaning(doc)}"
    )
    if doc.get("reason"):
        lines.append(f"reason: {doc['reason']}")
    for key, value in doc["summary"].items():
        if key == "clusters":  # SecFPP: the centroids are long; sizes say what matters
            lines.append(
                f"clusters: k={len(value['counts'])} sizes {value['counts']} "
                f"({value['secure_sums']} secure sums, {value['seconds']:.1f} s)"
            )
        elif key == "privacy" and isinstance(value, dict) and "node-epsilons" in value:
            lines.extend(privacy_lines(value))
        else:
            lines.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    for name in REFERENCES:
        lines.extend(f"{name}-{k}: {v:.4g}" for k, v in doc.get(name, {}).items())
    return "\n".join(lines)


def privacy_lines(privacy: dict[str, Any]) -> list[str]:
    """The run's epsilon (the largest node's) and every node's, at its declared rate."""
    nodes = privacy["node-epsilons"]
    lines = [
        f"epsilon: {privacy['epsilon']:.4g} (the largest node's; delta {privacy['delta']:g}, "
        f"{privacy['guarantee']}, rate bound {privacy['sample-rate-bound']:g})"
    ]
    lines.extend(
        f"  node {node}: sample-rate {entry['sample-rate']:.4g}  epsilon {entry['epsilon']:.4g}"
        for node, entry in nodes.items()
    )
    if not nodes:
        lines.append("  (no node stated a rate: every node accounted at the bound)")
    return lines


CURVE_STYLES = {
    # colour, line style and marker per curve: equal values (eps-local and eps-global
    # usually coincide) must still be told apart, in colour and in greyscale
    "local-acc": ("tab:blue", "-", "o"),
    "neighbour-acc": ("tab:orange", "--", "s"),
    "harmonic-acc": ("tab:red", "-", "^"),
    "all-acc": ("tab:purple", "-.", "v"),
    "epsilon": ("tab:green", "-", "D"),
    "eps-local": ("tab:blue", "-", "o"),
    "eps-global": ("tab:orange", "--", "s"),
}
TARGET_KEYS = {"epsilon": "epsilon", "epsilon-local": "eps-local", "epsilon-global": "eps-global"}
"""Run-config keys of a target epsilon -> the curve it bounds: the composed epsilon, or
(results of runs before the composed accounting) one target per channel."""


def plot_run(doc: dict[str, Any], out_dir: Path) -> None:
    """accuracy.png (local, neighbour, harmonic mean and all-class per round, with the
    references) and epsilon.png (spent and target).
    """
    import matplotlib.pyplot as plt

    for name, fig in draw_run(doc).items():
        fig.savefig(Path(out_dir) / name, dpi=100)
        plt.close(fig)


def draw_run(doc: dict[str, Any]) -> dict[str, Figure]:
    """The run's figures by file name, for ``plot_run`` to save (and tests to inspect)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    config = doc.get("config", {})
    title = f"{config.get('method')} / dp-mode {config.get('dp-mode')}"
    figures = {}
    for name, keys, ylabel in (
        ("accuracy.png", ACCURACIES, f"accuracy ({accuracy_meaning(doc)})"),
        ("epsilon.png", ("epsilon", "eps-local", "eps-global"), "epsilon spent"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(r["round"], r[key]) for r in doc["rounds"] if isinstance(r.get(key), float)]
            if points:
                colour, style, marker = CURVE_STYLES[key]
                ax.plot(*zip(*points, strict=True), color=colour, linestyle=style,
                        marker=marker, markersize=4, label=key)
        if name == "epsilon.png":
            _draw_targets(ax, config)
        else:
            _draw_references(ax, doc)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        figures[name] = fig
    return figures


def _draw_targets(ax: Any, config: dict[str, Any]) -> None:
    """The target epsilon(s) of the run config as horizontal lines (none without DP)."""
    if config.get("dp-mode") == "off":
        return
    by_value: dict[float, list[str]] = {}  # equal targets share one line (and one label)
    for key in TARGET_KEYS:
        target = config.get(key)
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            by_value.setdefault(float(target), []).append(key)
    for target, keys in by_value.items():
        curve = TARGET_KEYS[keys[0]] if len(keys) == 1 else None
        colour = CURVE_STYLES[curve][0] if curve else "black"
        ax.axhline(target, color=colour, linestyle=":", linewidth=1.2,
                   label=f"target {' = '.join(keys)} = {target:g}")


def _draw_references(ax: Any, doc: dict[str, Any]) -> None:
    """The references to beat as horizontal lines: zero-shot CLIP's accuracies (the
    hand-written prompt), and the class-prior frontier's harmonic mean (the headline's).
    """
    for key, value in doc.get("zeroshot", {}).items():
        if key in CURVE_STYLES and isinstance(value, (int, float)):
            ax.axhline(float(value), color=CURVE_STYLES[key][0], linestyle=":",
                       linewidth=1.2, label=f"zero-shot {key}")
    prior = doc.get("prior", {}).get("harmonic-acc")
    if isinstance(prior, (int, float)):
        ax.axhline(float(prior), color=CURVE_STYLES["harmonic-acc"][0], linestyle=(0, (5, 1)),
                   linewidth=1.6, label="class-prior frontier harmonic-acc")
