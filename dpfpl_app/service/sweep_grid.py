"""A sweep's grid and what counts as one of its cells.

The grid (methods x epsilon x seed x rank, plus reference rows) is saved beside the
results as ``sweep.json`` so that a resumed sweep is the same sweep. A cell counts only
when its run completed every round with every client trained and evaluated: anything
less would let the last-10-round mean slide over rounds without a valid reply.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dpfpl_app.config import DPMode, Method, RunConfig
from dpfpl_app.federation.results import RESULTS_FILE

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
MEASURES = (("local", "local-acc"), ("neighbour", "neighbour-acc"),
            ("harmonic", "harmonic-acc"), ("all", "all-acc"))
"""(short name, results key): local, neighbour, their harmonic mean (the headline, mean
over clients of each client's) and all-class accuracy; a run recorded before the last
two existed has them missing, not zero."""
REFERENCE_BLOCKS = (("zeroshot", "Zero-shot template"),
                    ("prior", "Class-prior frontier (zero-shot + best own-class bias)"))
"""results.json's reference blocks (``federation.results.REFERENCES``) and their labels."""
SPEC_FILE = "sweep.json"
FAILED_DIR = "failed"  # the Flower log of each cell whose last attempt failed


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


def read_cell(out_dir: Path, cell: Cell, clients: int) -> tuple[dict[str, Any] | None, str]:
    """The cell's results if they count (``incomplete_reason``); else None and why not."""
    path = out_dir / "runs" / cell.name / RESULTS_FILE
    if not path.is_file():
        return None, f"no {RESULTS_FILE} (the run never started or wrote nothing)"
    doc = json.loads(path.read_text())
    reason = incomplete_reason(doc, clients)
    return (None, reason) if reason else (doc, "complete")


def cell_result(out_dir: Path, cell: Cell, clients: int) -> dict[str, Any] | None:
    """The cell's results if its run counts, else None."""
    return read_cell(out_dir, cell, clients)[0]


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
        secure = doc["config"].get("aggregation") == "secure"  # no per-client figures kept
        if len(local) != clients and not secure:
            return f"round {row['round']}: local accuracy of {len(local)} of {clients} clients"
    return None
