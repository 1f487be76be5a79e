"""A node's privacy budget across runs: the ledger of what every run spent on its data.

Each run starts its own accounting, so an organisation whose data joins ten runs has
spent ten runs' privacy. A node whose operator sets ``privacy-budget`` (an epsilon, at
``privacy-budget-delta``, default 1e-5) in its node config keeps a ledger in its state
directory: per run, the plan's public numbers, the node's declared rate, the steps
actually taken and the RDP curve of those steps (``ChannelPlan.rdp_curve``, the curve
the printed epsilon is computed from). Runs compose by summing their curves order by
order (RDP composition), and the sum is converted to epsilon at the node's delta.

Charging (``Ledger.charge``) happens before a round samples any data: the node checks
that the runs already in the ledger plus this run's FULL plan stay within the budget,
refuses the round otherwise (naming budget, spent and asked), and writes the round's
steps to the ledger first, atomically, so a crash between training and the reply never
loses a spend (at worst it records a round that released nothing: conservative). A
run without an accounted guarantee (no DP while training, paper mode, reproducible
noise) has an infinite curve: recorded on every node, refused on one with a budget.

Torch-free (numpy and JSON): ``dpfpl budget`` reads a ledger without the model stack.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpfpl_app.privacy.calibration import PrivacyBudgetError
from dpfpl_app.privacy.secure_channel import ORDERS
from dpfpl_app.secagg import rdp_to_epsilon

BUDGET_KEY = "privacy-budget"
BUDGET_DELTA_KEY = "privacy-budget-delta"
DEFAULT_DELTA = 1e-5
LEDGER_DIR = "privacy-ledger"
LEDGER_VERSION = 1


class BudgetExceeded(PrivacyBudgetError):
    """The node's privacy budget does not cover this run's plan."""


@dataclass(frozen=True)
class BudgetPolicy:
    """A node's cap on the composed epsilon of every run on its data (None: no cap)."""

    epsilon: float | None
    delta: float = DEFAULT_DELTA

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> BudgetPolicy:
        """The policy of ``--node-config "privacy-budget=E privacy-budget-delta=D"``."""
        epsilon = _positive(node_config, BUDGET_KEY, None)
        delta = _positive(node_config, BUDGET_DELTA_KEY, DEFAULT_DELTA)
        if delta is None or not delta < 1.0:
            raise PrivacyBudgetError(
                f"node config {BUDGET_DELTA_KEY}={delta!r} must be in (0, 1): restart the "
                f'SuperNode with --node-config "... {BUDGET_DELTA_KEY}=1e-5"'
            )
        return cls(epsilon, delta)


def _positive(node_config: Mapping[str, object], key: str, default: float | None) -> float | None:
    if key not in node_config:
        return default
    try:
        value = float(str(node_config[key]))
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise PrivacyBudgetError(
            f"node config {key}={node_config[key]!r} must be a positive number: restart the "
            f'SuperNode with a corrected --node-config "{key}=..."'
        )
    return value


@dataclass
class RunSpend:
    """One run's entry: its public plan, the node's rate, the steps taken and their curve."""

    run_name: str
    guarantee: str
    sample_rate: float
    steps: int
    planned_steps: int
    plan: dict[str, Any]
    rdp: list[float]  # at ``ORDERS``

    def curve(self) -> np.ndarray:
        return np.asarray(self.rdp, dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {
            "run-name": self.run_name,
            "guarantee": self.guarantee,
            "sample-rate": self.sample_rate,
            "steps": self.steps,
            "planned-steps": self.planned_steps,
            "plan": self.plan,
            "rdp": self.rdp,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunSpend:
        return cls(
            run_name=str(doc["run-name"]),
            guarantee=str(doc["guarantee"]),
            sample_rate=float(doc["sample-rate"]),
            steps=int(doc["steps"]),
            planned_steps=int(doc["planned-steps"]),
            plan=dict(doc["plan"]),
            rdp=[float(x) for x in doc["rdp"]],
        )


@dataclass
class Ledger:
    """Every run's spend on one partition's data, on the node's disk."""

    path: Path
    runs: dict[str, RunSpend] = field(default_factory=dict)
    policy: BudgetPolicy | None = None  # the node's policy at the last charge (for reports)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        """The ledger at ``path`` (empty if there is none yet)."""
        if not path.is_file():
            return cls(path)
        doc = json.loads(path.read_text())
        if doc.get("version") != LEDGER_VERSION or list(doc.get("orders", [])) != list(ORDERS):
            raise PrivacyBudgetError(
                f"{path} is not a version-{LEDGER_VERSION} ledger over this dpfpl's RDP orders: "
                "it cannot be composed with new runs; keep it, and start the node with "
                "another state-dir only if you account its runs yourself"
            )
        policy = doc.get("policy")
        return cls(
            path,
            {key: RunSpend.from_json(v) for key, v in doc["runs"].items()},
            BudgetPolicy(policy["epsilon"], policy["delta"]) if policy else None,
        )

    def save(self) -> None:
        """Write atomically (a crash leaves the old or the new ledger), readable by the
        node's user only (0600): the ledger says which runs this node's data joined.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {
            "version": LEDGER_VERSION,
            "orders": list(ORDERS),
            "policy": (
                {"epsilon": self.policy.epsilon, "delta": self.policy.delta}
                if self.policy
                else None
            ),
            "runs": {key: run.to_json() for key, run in self.runs.items()},
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    # --- composition ------------------------------------------------------------------
    def total_curve(self, exclude: str | None = None) -> np.ndarray:
        total = np.zeros(len(ORDERS))
        for key, run in self.runs.items():
            if key != exclude:
                total = total + run.curve()
        return total

    def epsilon(self, delta: float, exclude: str | None = None) -> float:
        """Composed epsilon of every run (but ``exclude``) at ``delta``."""
        return curve_epsilon(self.total_curve(exclude), delta)

    # --- charging -----------------------------------------------------------------------
    def charge(
        self, key: str, spend: RunSpend, full_plan: np.ndarray, policy: BudgetPolicy
    ) -> None:
        """Record ``spend`` as run ``key``'s entry, after checking the budget.

        ``full_plan``: the curve of everything run ``key`` may take (steps already taken
        plus the rest of its plan). Refused, with nothing written, if the other runs plus
        the full plan exceed the policy's epsilon, or if the run has no accounted guarantee.
        """
        if policy.epsilon is not None:
            spent = self.epsilon(policy.delta, exclude=key)
            asked = curve_epsilon(full_plan, policy.delta)
            total = curve_epsilon(self.total_curve(exclude=key) + full_plan, policy.delta)
            if total > policy.epsilon:
                why = (
                    f"this run has no accounted guarantee ({spend.guarantee})"
                    if not math.isfinite(asked)
                    else f"composed total {total:.4g} > budget"
                )
                raise BudgetExceeded(
                    f"node privacy budget {BUDGET_KEY}={policy.epsilon:g} at delta "
                    f"{policy.delta:g}: spent {spent:.4g} by {len(self.runs) - (key in self.runs)}"
                    f" earlier run(s), this run ({spend.run_name or key}) asks {asked:.4g} for its "
                    f"full plan ({spend.planned_steps} steps at rate {spend.sample_rate:g}): "
                    f"{why}. Refused before training; ask for a run with a smaller epsilon "
                    f"or fewer rounds, or raise this node's {BUDGET_KEY} (`dpfpl budget` "
                    "shows the ledger)"
                )
        self.runs[key] = spend
        self.policy = policy
        self.save()


def curve_epsilon(curve: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve at ``ORDERS`` (0 for none, inf for unaccounted)."""
    if not np.all(np.isfinite(curve)):
        return math.inf
    if not curve.any():
        return 0.0
    return rdp_to_epsilon(ORDERS, curve, delta)[0]


def ledger_path(state_root: Path, partition_id: int) -> Path:
    """One ledger per partition of a state root (simulated nodes may share a root)."""
    return state_root / LEDGER_DIR / f"partition-{partition_id}.json"


def ledger_report(path: Path, delta: float | None = None, budget: float | None = None) -> str:
    """The ledger in words: per run its epsilon alone and steps; the composed total; left.

    ``delta`` and ``budget`` default to the node's policy at its last charge.
    """
    ledger = Ledger.load(path)
    policy = ledger.policy or BudgetPolicy(None)
    delta = policy.delta if delta is None else delta
    budget = policy.epsilon if budget is None else budget
    lines = [f"{path}  (epsilon at delta {delta:g})"]
    width = max([len(k) for k in ledger.runs] + [6])
    lines.append(
        f"  {'run':<{width}}  {'name':<12} {'guarantee':<20} {'rate':>8} {'steps':>11}"
        f" {'epsilon alone':>14}"
    )
    for key, run in sorted(ledger.runs.items()):
        alone = curve_epsilon(run.curve(), delta)
        lines.append(
            f"  {key:<{width}}  {run.run_name:<12} {run.guarantee:<20} {run.sample_rate:>8.4g}"
            f" {f'{run.steps}/{run.planned_steps}':>11} {alone:>14.4g}"
        )
    total = ledger.epsilon(delta)
    lines.append(f"  composed total over {len(ledger.runs)} run(s): epsilon {total:.4g}")
    if budget is not None:
        lines.append(f"  budget {budget:g}: left {max(0.0, budget - total):.4g}")
    else:
        lines.append(f"  no budget set (node config {BUDGET_KEY}): nothing is refused")
    return "\n".join(lines)
