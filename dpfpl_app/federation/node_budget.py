"""The node's side of its privacy budget: charge each round to the ledger before training.

``privacy.budget`` keeps the ledger and composes it; this module connects it to a run:
the ledger key is the Flower run id (a resumed run's steps continue under its new id,
and RDP composition makes the split exact), the curve is the run plan's at the node's
declared rate, and only an accounted guarantee has a finite one (reproducible noise is
derived from the public seed: its epsilon is nominal, so the ledger counts it as
unbounded, like no DP and paper mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dpfpl_app.config import RunConfig
from dpfpl_app.privacy.budget import BudgetPolicy, Ledger, RunSpend, ledger_path
from dpfpl_app.privacy.dp_channel import ChannelPlan, Guarantee
from dpfpl_app.privacy.secure_channel import ORDERS

LEDGER_ACCOUNTED = frozenset({Guarantee.ACCOUNTED, Guarantee.NOTHING_RELEASED})


def spend_curve(plan: ChannelPlan, rate: float, steps: int) -> np.ndarray:
    """RDP curve of ``steps`` of the plan at ``rate``; infinite without a real guarantee."""
    releases = steps > 0 or plan.z_summary > 0
    if releases and plan.guarantee not in LEDGER_ACCOUNTED:
        return np.full(len(ORDERS), math.inf)
    return plan.rdp_curve(rate, steps)


def ledger_charger(
    cfg: RunConfig,
    plan: ChannelPlan,
    node_config: Mapping[str, object],
    *,
    state_root: Path,
    run_id: int,
    partition_id: int,
    sample_rate: float,
) -> Callable[..., None]:
    """``charge(steps_after)``: record a round before it samples (``ClientTrainer``);
    ``charge(steps, 0)``: record SecFPP's summary release before it is drawn.

    ``steps_after`` is the trainer's step count once the round is done, counting the
    steps of any run it resumed; the run's full plan is what it already took under this
    run id plus everything its plan still allows.
    """
    policy = BudgetPolicy.from_node_config(node_config)  # a bad value stops before data
    path, key = ledger_path(state_root, partition_id), str(run_id)

    def charge(steps_after: int, new_steps: int | None = None) -> None:
        # new_steps: what this call adds (a round's K; 0 for SecFPP's summary release,
        # which the plan's curve holds from the start)
        ledger = Ledger.load(path)
        before = ledger.runs.get(key)
        added = cfg.local_steps if new_steps is None else new_steps
        run_steps = (before.steps if before else 0) + added
        remaining = max(0, plan.planned_steps - steps_after)
        spend = RunSpend(
            run_name=cfg.run_name,
            guarantee=plan.guarantee.value,
            sample_rate=sample_rate,
            steps=run_steps,
            planned_steps=plan.planned_steps,
            plan=plan.describe(),
            rdp=spend_curve(plan, sample_rate, run_steps).tolist(),
        )
        ledger.charge(key, spend, spend_curve(plan, sample_rate, run_steps + remaining), policy)

    return charge
