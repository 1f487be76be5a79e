"""SecFPP's clustering inside the guarantee: one noised summary, all else post-processing.

Issue 28 items 3 and 4. (a) A differencing attacker over everything the clustering
releases recovers clients' clustering inputs, and those are now noised releases, off the
data's exact summary by about the noise. (b) A node's cluster choice and clustering
inputs are a function of its stored release: changing a training image after it, or
restarting the node, changes neither. (c) The printed SecFPP epsilon composes the release
with the prompt channels, as Google's ``dp_accounting`` composes them.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from dpfpl_app.config import RunConfig
from dpfpl_app.method import domain_clusters as dc
from dpfpl_app.privacy.dp_channel import plan_for
from dpfpl_app.privacy.noise import NoiseSource
from dpfpl_app.privacy.secure_channel import ORDERS, SecureSetting
from tests.secfpp_replay import ExactSums

DIM, CLIENTS, CLIP = 8, 12, 0.5
DELTA = 1e-5


def _secfpp(**values: object) -> RunConfig:
    return RunConfig.from_flower({
        "method": "secfpp", "dp-mode": "per-sample", "min-nodes": CLIENTS,
        "summary-dim": DIM, "summary-clip": CLIP, **values,
    })


# --- (a) the differencing attack of the issue ----------------------------------------
def _differences(run: ExactSums, n: int) -> list[np.ndarray]:
    """Every released group sum minus another with one member less, that is a unit vector.

    Clustering points are unit vectors, so such a difference is (almost surely) exactly
    one client's point: the attacker of the issue, over the counts and sums released.
    """
    groups: list[tuple[int, np.ndarray]] = []
    for phase, layout, _, total in run.released:
        if phase == "moments":
            groups.append((n, total[:DIM]))
        elif phase == "sum":
            stats = dc.SlotStats.from_total(total, layout, DIM)
            groups += [(int(c), s) for c, s in zip(stats.counts, stats.sums, strict=True) if c]
    found: list[np.ndarray] = []
    for (ca, sa), (cb, sb) in itertools.permutations(groups, 2):
        candidate = sa - sb
        if ca - cb == 1 and abs(np.linalg.norm(candidate) - 1.0) < 1e-9 and not any(
            np.allclose(candidate, f, atol=1e-9) for f in found
        ):
            found.append(candidate)
    return found


def _population(rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """12 clients in 3 domains: per-image vectors around the domain's shift."""
    shifts = 0.25 * np.eye(DIM)[:3]
    vectors, sizes = [], []
    for i in range(CLIENTS):
        n = int(rng.integers(150, 300))
        vectors.append(shifts[i % 3] + 0.15 * rng.standard_normal((n, DIM)))
        sizes.append(n)
    return vectors, sizes


def test_differencing_the_clustering_sums_recovers_only_noised_summaries() -> None:
    cfg = _secfpp(**{"max-clusters": 4, "cluster-restarts": 8, "cluster-iterations": 5})
    z = cfg.summary_noise_multiplier
    recovered = 0
    for seed in range(10):
        vectors, sizes = _population(np.random.default_rng(seed))
        means = [dc.clipped_mean(v, clip=CLIP, size=n) for v, n in zip(vectors, sizes, strict=True)]
        exact = [dc.point(m) for m in means]
        released = [
            dc.point(dc.release(m, NoiseSource.secure().gaussian((DIM,), std=1.0,
                                                                  dtype=torch.float64).numpy(),
                                clip=CLIP, size=n, noise_multiplier=z))
            for m, n in zip(means, sizes, strict=True)
        ]
        run = ExactSums(cfg, released)
        run.run()

        for found in _differences(run, CLIENTS):
            recovered += 1
            # the attack isolates one client's clustering input exactly ...
            i = int(np.argmin([np.linalg.norm(found - p) for p in released]))
            np.testing.assert_allclose(found, released[i], atol=1e-9)
            # ... which is a noised release: off the data's summary by about the noise
            expected = z * CLIP / sizes[i] * math.sqrt(DIM - 1) / np.linalg.norm(means[i])
            error = float(np.linalg.norm(found - exact[i]))
            assert 0.15 * expected < error < 3.0 * expected, (error, expected)
    assert recovered > 0  # the attack works: it just learns nothing exact


# --- (b) the cluster choice is post-processing of the stored release -----------------
def test_cluster_choice_and_inputs_follow_the_stored_release_not_the_data(
    digits_backbone: Path, tmp_path: Path
) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

    from dpfpl_app.federation import domain_wire, wire
    from dpfpl_app.federation.client_messages import cluster_contribution, shared_prompt
    from dpfpl_app.federation.client_node import build_trainer, save_state
    from dpfpl_app.federation.secure_clustering import CLUSTER_ARRAYS, CLUSTER_RECORD
    from tests.flower_harness import make_instruction

    cfg = RunConfig.from_flower({
        "method": "secfpp", "dp-mode": "per-sample", "dataset": "domain-digits",
        "min-nodes": 6, "max-clusters": 2, "cluster-restarts": 2, "summary-dim": DIM,
        "state-dir": str(tmp_path / "state"), "run-name": "t",
    })

    def context() -> Context:
        config = {"partition-id": 1, "num-partitions": 6}
        return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(),
                       run_config={})

    def clustering_input(trainer: object, phase: str, centroids: np.ndarray) -> np.ndarray:
        layout = dc.Layout((1, 2, 2))
        content = RecordDict({
            CLUSTER_RECORD: ConfigRecord({"phase": phase, "ks": list(layout.ks)}),
            CLUSTER_ARRAYS: ArrayRecord({"centroids": Array(centroids),
                                         "open": Array(np.ones(5, dtype=np.uint8))}),
        })
        msg = make_instruction(content, dst_node_id=1, message_type="query.secagg_collect_masked")
        return cluster_contribution(trainer, msg)  # type: ignore[arg-type]

    def cluster(trainer: object, centroids: np.ndarray) -> int:
        prompts = torch.zeros(2, cfg.n_ctx, 4)
        content = RecordDict({
            wire.ARRAYS_RECORD: domain_wire.domain_record(prompts, centroids),
            wire.CONFIG_RECORD: ConfigRecord({wire.SERVER_ROUND: 1}),
        })
        msg = make_instruction(content, dst_node_id=1, message_type="train")
        return shared_prompt(trainer, msg)[1]  # type: ignore[arg-type]

    # Prepare: the node releases its summary (its first clustering input) and keeps it
    trainer = build_trainer(cfg, context())
    point = trainer.domain_point()
    data = trainer.data
    vectors = dc.image_vectors(data.train_features[0].double().numpy(),
                               data.train_labels.numpy(),
                               trainer.template_text().double().numpy(), DIM, cfg.seed)
    size = cfg.batch_size / trainer.sample_rate
    before = dc.point(dc.clipped_mean(vectors, clip=cfg.summary_clip, size=size))
    centroids3 = np.stack([point, point, -point, point, -point])
    first = {ph: clustering_input(trainer, ph, centroids3) for ph in ("moments", "count", "sum")}
    save_state(trainer, cfg, context())

    # Execute: one training image becomes another domain's image, after the release
    trainer.data.train_features[0, 0] = -trainer.data.train_features[0, 0]
    vectors = dc.image_vectors(data.train_features[0].double().numpy(),
                               data.train_labels.numpy(),
                               trainer.template_text().double().numpy(), DIM, cfg.seed)
    after = dc.point(dc.clipped_mean(vectors, clip=cfg.summary_clip, size=size))
    # two centroids straddling the release, tilted so the change would flip an exact summary
    u = (after - before) / np.linalg.norm(after - before)
    gap = 0.5 * float(np.linalg.norm(after - before))
    centroids = np.stack([point + gap * u, point - 0.9 * gap * u])
    restarted = build_trainer(cfg, context())  # a restarted node: state from its disk

    # Assert: the exact summary moved, the released point and everything after it did not
    assert np.linalg.norm(after - before) > 0
    assert cluster(trainer, centroids) == cluster(restarted, centroids) == 1
    for ph, vector in first.items():
        np.testing.assert_array_equal(clustering_input(trainer, ph, centroids3), vector)
        np.testing.assert_array_equal(clustering_input(restarted, ph, centroids3), vector)
    np.testing.assert_array_equal(restarted.domain_point(), point)
    assert not np.allclose(point, before, atol=1e-6)  # the release is noised


# --- (c) the printed epsilon composes the release with the prompt channels ------------
@pytest.mark.parametrize(("target", "z_summary"), [(4.0, 8.0), (1.0, 8.0), (2.0, 16.0)])
def test_secfpp_epsilon_composes_the_summary_release_as_dp_accounting_does(
    target: float, z_summary: float
) -> None:
    plan = plan_for(_secfpp(**{"epsilon": target, "num-server-rounds": 10,
                               "summary-noise-multiplier": z_summary}))
    steps = plan.planned_steps

    # Execute: the prompt steps' RDP (our Skellam bound) plus dp_accounting's Gaussian
    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(dpa.GaussianDpEvent(z_summary))
    prompts = SecureSetting(plan.sample_rate, plan.z_local, plan.z_global)
    curve = steps * prompts.step_rdp(1.0) + np.asarray(accountant._rdp)
    reference, _ = rdp.compute_epsilon(list(ORDERS), curve.tolist(), DELTA)
    alone = accountant.get_epsilon(DELTA)

    # Assert: the printed figure is the composition; the release's share is in it
    printed = plan.epsilon(steps)
    assert printed == pytest.approx(reference, rel=1e-3)
    assert plan.components(steps)["eps-summary-alone"] == pytest.approx(alone, rel=1e-3)
    assert prompts.epsilon([1.0] * steps, DELTA) < printed <= target
    assert plan.epsilon(0) == pytest.approx(alone, rel=1e-3)  # spent before any round
    assert "domain summary" in plan.meaning and "NOT covered" not in plan.meaning


def test_a_summary_release_that_spends_the_whole_budget_is_refused() -> None:
    from dpfpl_app.privacy.calibration import PrivacyBudgetError

    with pytest.raises(PrivacyBudgetError, match="summary release alone"):
        plan_for(_secfpp(**{"epsilon": 0.5, "summary-noise-multiplier": 4.0}))
