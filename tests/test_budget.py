"""A node's privacy budget across runs: the ledger, its composition, its refusals."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

import client_app as client_module
import server_app as server_module
from dpfpl_app.config import RunConfig
from dpfpl_app.federation.client_node import build_trainer
from dpfpl_app.privacy.budget import (
    BudgetExceeded,
    BudgetPolicy,
    Ledger,
    RunSpend,
    curve_epsilon,
    ledger_path,
)
from dpfpl_app.privacy.dp_channel import plan_for
from dpfpl_app.privacy.secure_channel import ORDERS
from dpfpl_app.service.cli import main as dpfpl
from tests.flower_harness import federation_config, run_server_app

DELTA = 1e-5


def _plan(**values: object):  # noqa: ANN202 - a ChannelPlan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_for(RunConfig.from_flower({"dp-mode": "per-sample", **values}))


def _spend(plan, rate: float, steps: int, name: str = "r") -> RunSpend:  # noqa: ANN001
    return RunSpend(name, plan.guarantee.value, rate, steps, plan.planned_steps,
                    plan.describe(), plan.rdp_curve(rate, steps).tolist())


def test_composed_total_of_two_runs_agrees_with_dp_accounting_rdp(tmp_path: Path) -> None:
    # Prepare: two runs of different plans at different declared rates
    first = _plan(**{"num-server-rounds": 30, "epsilon": 2.0, "max-sample-rate": 0.2})
    second = _plan(**{"num-server-rounds": 10, "local-steps": 2, "epsilon": 1.0})
    ledger = Ledger(ledger_path(tmp_path, 0))
    ledger.charge("1", _spend(first, 0.1, 30), first.rdp_curve(0.1, 30), BudgetPolicy(None))
    ledger.charge("2", _spend(second, 0.3, 20), second.rdp_curve(0.3, 20), BudgetPolicy(None))

    # Execute
    ours = Ledger.load(ledger.path).epsilon(DELTA)

    # Assert: Google's RDP accountant composing the same subsampled Gaussian steps
    accountant = dpa.rdp.RdpAccountant(orders=[float(a) for a in ORDERS])
    for plan, rate, steps in ((first, 0.1, 30), (second, 0.3, 20)):
        accountant.compose(dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(plan.z_step)), steps))
    assert ours == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-4)
    alone = [curve_epsilon(run.curve(), DELTA) for run in ledger.runs.values()]
    assert max(alone) < ours < sum(alone)  # RDP composes tighter than adding epsilons


def test_charge_refuses_an_overspend_and_an_unaccounted_run_writing_nothing(
    tmp_path: Path,
) -> None:
    plan = _plan(**{"num-server-rounds": 20, "epsilon": 1.0})
    full = plan.rdp_curve(0.5, 20)
    one, two = curve_epsilon(full, DELTA), curve_epsilon(2 * full, DELTA)
    policy = BudgetPolicy((one + two) / 2, DELTA)
    ledger = Ledger(ledger_path(tmp_path, 3))
    ledger.charge("1", _spend(plan, 0.5, 20), full, policy)  # the first run fits, all spent
    before = ledger.path.read_bytes()

    # the second run's first round: its FULL plan would overspend
    with pytest.raises(BudgetExceeded, match=r"privacy-budget=.*spent .* asks .* full plan"):
        Ledger.load(ledger.path).charge("2", _spend(plan, 0.5, 1), full, policy)
    unaccounted = np.full(len(ORDERS), math.inf)
    with pytest.raises(BudgetExceeded, match="no accounted guarantee"):
        Ledger.load(ledger.path).charge("3", _spend(plan, 0.5, 1), unaccounted, policy)

    assert ledger.path.read_bytes() == before
    assert ledger.path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in ledger.path.parent.iterdir()] == [ledger.path.name]  # no temp


def test_budget_command_prints_each_run_the_total_and_what_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _plan(**{"num-server-rounds": 20, "epsilon": 1.0})
    ledger = Ledger(ledger_path(tmp_path, 0))
    policy = BudgetPolicy(5.0, DELTA)
    ledger.charge("11", _spend(plan, 0.5, 20, "first"), plan.rdp_curve(0.5, 20), policy)
    ledger.charge("12", _spend(plan, 0.25, 8, "second"), plan.rdp_curve(0.25, 20), policy)

    assert dpfpl(["budget", "--state-dir", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    total = ledger.epsilon(DELTA)
    assert "first" in out and "20/20" in out and "second" in out and "8/20" in out
    assert f"{curve_epsilon(plan.rdp_curve(0.5, 20), DELTA):.4g}" in out
    assert f"composed total over 2 run(s): epsilon {total:.4g}" in out
    assert f"budget 5: left {5.0 - total:.4g}" in out


# --- on a real node --------------------------------------------------------------------
RATE = 0.1  # both nodes declare it: the budget below is sized from its curve


def _run_config(tmp_path: Path, model: Path) -> dict:
    """Two rounds of the main job's method on the random plumbing CLIP (fast: the budget
    logic does not depend on what the prompt learns).
    """
    return federation_config(
        tmp_path,
        **{"min-nodes": 2, "num-server-rounds": 2, "reproducible-noise": False, "epsilon": 1.0,
           "model": str(model)},
    )


def _budget_between_one_and_two_runs(cfg: dict) -> float:
    plan = plan_for(RunConfig.from_flower(cfg))
    full = plan.rdp_curve(RATE, plan.planned_steps)
    return (curve_epsilon(full, DELTA) + curve_epsilon(2 * full, DELTA)) / 2


def test_a_node_with_a_budget_refuses_the_run_that_would_overspend_it_across_a_restart(
    plumbing_clip: Path, tmp_path: Path
) -> None:
    # Prepare: two nodes whose budget covers one run of this plan, not two
    cfg = _run_config(tmp_path, plumbing_clip)
    budget = _budget_between_one_and_two_runs(cfg)
    nodes = [{"sample-rate": RATE, "privacy-budget": budget}] * 2
    run_server_app(server_module.app, client_app=client_module.app, num_nodes=2,
                   run_config=cfg, node_configs=nodes, run_id=101)
    ledger = ledger_path(tmp_path / "state", 0)
    first = json.loads(ledger.read_text())
    assert first["runs"]["101"]["steps"] == 2

    # Execute: the same nodes restarted (fresh contexts and processes' state), next run
    second = run_server_app(
        server_module.app, client_app=client_module.app, num_nodes=2,
        run_config={**cfg, "run-name": "t2"}, node_configs=nodes, run_id=102,
    )

    # Assert: every train message refused before training, naming budget, spent, asked;
    # the ledger holds the first run only and the second run's node trained nothing
    errors = [m.error.reason for m in second.replies if m.has_error()]
    assert errors and all("privacy-budget=" in e and "spent" in e and "asks" in e
                          for e in errors)
    assert json.loads(ledger.read_text())["runs"].keys() == {"101"}
    for meta in (tmp_path / "state" / "t2").glob("partition-*/meta.json"):  # evaluated only
        assert json.loads(meta.read_text())["steps_taken"] == 0
    doc = json.loads((tmp_path / "runs" / "t2" / "results.json").read_text())
    assert all(row["accepted"] == 0 for row in doc["rounds"])


def test_the_ledger_keeps_a_round_whose_node_crashed_before_replying(
    plumbing_clip: Path, tmp_path: Path
) -> None:
    # Prepare: a node trains a round; its process dies before saving state or replying
    cfg = RunConfig.from_flower(_run_config(tmp_path, plumbing_clip))
    node_config = {"partition-id": 0, "num-partitions": 2, "privacy-budget": 50.0}
    context = Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config=cfg.to_flower())
    trainer = build_trainer(cfg, context)
    trainer.train_round(torch.zeros_like(trainer.learner.global_prompt), 1)
    del trainer  # crash: nothing saved, no reply

    # Execute: the restarted node reads its ledger
    ledger = Ledger.load(ledger_path(tmp_path / "state", 0))

    # Assert: the spend is there, at the node's rate, with its steps
    run = ledger.runs["9"]
    assert run.steps == cfg.local_steps and run.guarantee == "accounted"
    plan = plan_for(cfg)
    assert curve_epsilon(run.curve(), DELTA) == pytest.approx(
        curve_epsilon(plan.rdp_curve(run.sample_rate, run.steps), DELTA)
    )


def test_secfpp_summary_release_is_in_the_ledger_before_any_training_step(
    tmp_path: Path,
) -> None:
    # Prepare: a SecFPP plan (its domain summary is released before the first step)
    from dpfpl_app.federation.node_budget import ledger_charger

    values = {"method": "secfpp", "num-server-rounds": 5, "epsilon": 4.0}
    cfg = RunConfig.from_flower({"dp-mode": "per-sample", **values})
    plan = _plan(**values)
    assert plan.z_summary > 0
    rate = plan.sample_rate
    charge = ledger_charger(
        cfg, plan, {}, state_root=tmp_path, run_id=7, partition_id=0, sample_rate=rate
    )

    # Execute: what domain_point does before drawing the summary's noise
    charge(0, 0)

    # Assert: the entry holds no step but the summary's whole curve
    entry = Ledger.load(ledger_path(tmp_path, 0)).runs["7"]
    assert entry.steps == 0
    summary = np.asarray(ORDERS, dtype=np.float64) / (2.0 * plan.z_summary**2)
    np.testing.assert_allclose(entry.rdp, summary, rtol=1e-12)
    assert curve_epsilon(np.asarray(entry.rdp), DELTA) > 0
