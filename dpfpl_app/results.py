"""Results a person can read and plot: results.json, metrics.csv and PNG plots per run.

``results.json`` is rewritten after every round (atomically), so a crashed or stopped
run still leaves the rounds it finished; ``status`` says whether it completed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CSV_FILE = "metrics.csv"
LAST_ROUNDS = 10  # the paper reports the mean over the last 10 rounds


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

    def __init__(self, out_dir: Path, *, config: dict[str, Any], notes: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.doc: dict[str, Any] = {
            "status": "running",
            "config": config,
            "notes": notes,
            "versions": library_versions(),
            "rounds": [],
            "summary": {},
        }
        self._write()

    def record(self, server_round: int, metrics: dict[str, Any]) -> None:
        row = {"round": server_round, "elapsed-s": round(time.time() - self.started, 2)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self.doc["rounds"].append(row)
        self._write()

    def finish(self, *, status: str, extra: dict[str, Any] | None = None) -> Path:
        self.doc["status"] = status
        self.doc["summary"] = summarise(self.doc["rounds"])
        self.doc["summary"].update(extra or {})
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


def _plain(value: Any) -> Any:
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    )


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and last-10-round means of the accuracies; the final epsilons."""
    summary: dict[str, Any] = {"rounds": len(rounds)}
    for key in ("local-acc", "neighbour-acc"):
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


def load_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {run_dir}: is it a run's output directory?")
    return json.loads(path.read_text())


def summary_table(doc: dict[str, Any]) -> str:
    """A plain-text table of the run: one line per round and the summary."""
    cols = ["round", "local-acc", "neighbour-acc", "epsilon"]
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
    )
    lines.extend(
        f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in doc["summary"].items()
    )
    return "\n".join(lines)


def plot_run(doc: dict[str, Any], out_dir: Path) -> None:
    """accuracy.png (local and neighbour per round) and epsilon.png (both channels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = doc["rounds"]
    title = f"{doc['config'].get('method')} / dp-mode {doc['config'].get('dp-mode')}"
    for name, keys, ylabel in (
        ("accuracy.png", ("local-acc", "neighbour-acc"), "accuracy (mean over clients)"),
        ("epsilon.png", ("epsilon",), "epsilon spent (both channels composed)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(r["round"], r[key]) for r in rounds if isinstance(r.get(key), float)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
