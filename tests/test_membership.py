"""Membership-inference audit: the attacks' arithmetic, and that they detect real leakage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, norm
from sklearn.metrics import roc_auc_score

from dpfpl_app.audit.membership import (
    Outputs,
    Scores,
    ShadowAttack,
    auc,
    balanced_accuracy,
    check_disjoint,
    loss_scores,
    min_non_members,
    pool,
    pooled_estimates,
    threshold_scores,
    tpr_at_fpr,
)
from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip
from dpfpl_app.config import DPMode, Method, RunConfig
from dpfpl_app.data.features import encode_pixels
from dpfpl_app.data.federated_data import ClientData
from dpfpl_app.data.image_processing import images_to_pixel_values
from dpfpl_app.data.offline_data import LabelledImages, federated_pool
from dpfpl_app.federation.prompt_export import personalised_prompt_file
from dpfpl_app.method.client_trainer import ClientTrainer
from dpfpl_app.method.prompt_file import load_prompt_file
from dpfpl_app.service.predict import PromptClassifier


def _synthetic(signal: float, seed: int, n: int = 200, classes: int = 4) -> Outputs:
    """Logits whose true-class margin is ``signal`` larger for members than non-members."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    is_member = torch.arange(n) < n // 2
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 2.0 + signal * is_member.float()
    return Outputs(logits, labels, is_member)


def _scores(members: list[float], non_members: list[float]) -> Scores:
    values = np.array(members + non_members, dtype=float)
    return Scores(values, np.arange(len(values)) < len(members))


def test_auc_of_perfect_reversed_flat_and_tied_scores_matches_sklearn() -> None:
    perfect = _scores([6, 5, 4], [3, 2, 1])
    reversed_ = _scores([1, 2, 3], [4, 5, 6])
    flat = _scores([0, 0, 0], [0, 0, 0])
    rng = np.random.default_rng(0)
    tied = Scores(rng.integers(0, 4, 300).astype(float), rng.random(300) < 0.3)

    assert auc(perfect.scores, perfect.is_member) == 1.0
    assert auc(reversed_.scores, reversed_.is_member) == 0.0
    assert auc(flat.scores, flat.is_member) == 0.5
    assert auc(tied.scores, tied.is_member) == pytest.approx(
        roc_auc_score(tied.is_member, tied.scores), abs=1e-12
    )


def test_tpr_at_fpr_on_a_known_case() -> None:
    # Prepare: non-members score 0..99; the 10 highest (90..99) are the false positives
    # allowed at FPR 10%, so the threshold is the 11th highest, 89
    members = [89.0, 89.5, 95.0, 120.0]

    # Execute
    tpr = tpr_at_fpr(*_arrays(_scores(members, list(range(100)))), 0.1)

    # Assert: 89 itself does not pass (strictly above the threshold), the other three do
    assert tpr == 0.75


def test_tpr_at_fpr_never_exceeds_the_fpr_it_names() -> None:
    # members drawn like non-members: the attack's TPR is exactly the FPR it achieves
    rng = np.random.default_rng(1)
    for n_out, fpr in ((100, 0.1), (1000, 0.01), (250, 0.05), (137, 0.1)):
        values = rng.normal(size=n_out)
        same = Scores(np.concatenate([values, values]), np.arange(2 * n_out) < n_out)

        achieved = tpr_at_fpr(same.scores, same.is_member, fpr)

        assert fpr - 1 / n_out < achieved <= fpr, (n_out, fpr, achieved)


def test_tpr_at_fpr_refuses_an_fpr_the_non_members_cannot_resolve() -> None:
    rng = np.random.default_rng(2)
    hundred = _scores(list(rng.normal(size=20)), list(rng.normal(size=100)))
    ninety_nine = _scores(list(rng.normal(size=20)), list(rng.normal(size=99)))

    assert (min_non_members(0.1), min_non_members(0.01)) == (100, 1000)
    tpr_at_fpr(hundred.scores, hundred.is_member, 0.1)  # 10 false positives allowed: fine
    with pytest.raises(ValueError, match="at least 100 non-members .* not 99"):
        tpr_at_fpr(ninety_nine.scores, ninety_nine.is_member, 0.1)
    with pytest.raises(ValueError, match="at least 1000 non-members .* not 100"):
        tpr_at_fpr(hundred.scores, hundred.is_member, 0.01)
    with pytest.raises(ValueError, match="fpr must be in"):
        min_non_members(0.0)


def test_balanced_accuracy_weighs_members_and_non_members_equally() -> None:
    is_member = np.array([True] * 2 + [False] * 8)
    everyone_out = np.zeros(10, dtype=bool)
    one_of_each_right = np.array([True, False] + [False] * 4 + [True] * 4)

    assert balanced_accuracy(everyone_out, is_member) == 0.5  # plain accuracy would be 0.8
    assert balanced_accuracy(one_of_each_right, is_member) == pytest.approx(0.5 * (0.5 + 0.5))
    assert balanced_accuracy(is_member, is_member) == 1.0


def test_pooling_concatenates_seeds_so_offsets_between_seeds_count() -> None:
    # each seed separates perfectly, but seed b's scores sit above seed a's: one
    # threshold for all seeds (what pooling measures) gets 12 of 16 pairs right
    a, b = _scores([2, 3], [0, 1]), _scores([12, 13], [10, 11])

    pooled = pool([a, b])

    assert (pooled.members, pooled.non_members) == (4, 4)
    assert auc(a.scores, a.is_member) == auc(b.scores, b.is_member) == 1.0
    assert auc(pooled.scores, pooled.is_member) == 0.75
    with pytest.raises(ValueError, match="at least one"):
        pool([])


def test_bootstrap_interval_of_a_perfect_attack_is_a_point() -> None:
    runs = [_scores([5.0 + s, 6.0 + s], [0.0, 1.0, 2.0]) for s in range(3)]

    est = pooled_estimates(runs, {"auc": auc}, reps=200)["auc"]

    assert (est.value, est.low, est.high) == (1.0, 1.0, 1.0)


def test_bootstrap_interval_covers_a_known_auc() -> None:
    # Prepare: member scores N(d, 1), non-member scores N(0, 1): the AUC is Phi(d / sqrt 2).
    # Five "seeds" of 20 members and 200 non-members each, as in the benchmark
    shift = 0.75
    truth = float(norm.cdf(shift / np.sqrt(2)))  # 0.70
    rng = np.random.default_rng(3)

    # Execute: 40 independent experiments, each with its 95% interval
    covered, widths = 0, []
    for _ in range(40):
        runs = [
            Scores(
                np.concatenate([rng.normal(shift, 1, 20), rng.normal(0, 1, 200)]),
                np.arange(220) < 20,
            )
            for _ in range(5)
        ]
        est = pooled_estimates(runs, {"auc": auc}, reps=150, seed=int(rng.integers(1 << 30)))
        covered += est["auc"].low <= truth <= est["auc"].high
        widths.append(est["auc"].high - est["auc"].low)

    # Assert: nominal 95%; a 40-trial check only fails below ~85% coverage. The width
    # matches the AUC's standard error here (about 0.03 for 100 vs 1000)
    assert covered >= 34, covered
    assert 0.07 < float(np.median(widths)) < 0.17, np.median(widths)


def test_bootstrap_carries_the_spread_between_seeds() -> None:
    # the same pooled scores, once as five alike seeds and once as seeds that differ (one
    # seed leaks strongly, the others not at all): only the second interval is wide
    rng = np.random.default_rng(4)
    alike = [
        Scores(np.concatenate([rng.normal(0.3, 1, 20), rng.normal(0, 1, 100)]), _mask(20, 100))
        for _ in range(5)
    ]
    differ = [
        Scores(np.concatenate([rng.normal(d, 1, 20), rng.normal(0, 1, 100)]), _mask(20, 100))
        for d in (1.5, 0.0, 0.0, 0.0, 0.0)
    ]

    width = {
        name: (lambda e: e.high - e.low)(pooled_estimates(runs, {"auc": auc}, reps=400)["auc"])
        for name, runs in (("alike", alike), ("differ", differ))
    }

    assert width["differ"] > 1.3 * width["alike"], width


def test_scores_must_be_one_set_of_labelled_samples() -> None:
    with pytest.raises(ValueError, match="same length"):
        Scores(np.zeros(3), np.array([True, False]))
    with pytest.raises(ValueError, match="boolean"):
        Scores(np.zeros(2), np.array([1, 0]))
    with pytest.raises(ValueError, match="both members and non-members"):
        Scores(np.zeros(2), np.array([True, True]))


def test_threshold_attack_scores_lower_loss_as_member() -> None:
    leaky, blank = threshold_scores(_synthetic(3.0, seed=0)), threshold_scores(_synthetic(0.0, 0))

    assert auc(leaky.scores, leaky.is_member) > 0.8
    assert abs(auc(blank.scores, blank.is_member) - 0.5) < 0.1


def test_shadow_attack_transfers_from_shadows_to_the_target() -> None:
    shadows = [_synthetic(3.0, seed=s) for s in (1, 2, 3)]

    attack = ShadowAttack(seed=0).fit(shadows)
    leaky, blank = _synthetic(3.0, seed=9), _synthetic(0.0, seed=9)

    probabilities = attack.scores(leaky)
    assert auc(probabilities.scores, probabilities.is_member) > 0.8
    blank_probabilities = attack.scores(blank)
    assert abs(auc(blank_probabilities.scores, blank_probabilities.is_member) - 0.5) < 0.12
    # the rule fitted on the shadows alone (probability > 0.5), scored on the target
    verdicts = attack.decisions(leaky)
    assert set(np.unique(verdicts.scores)) <= {0.0, 1.0}
    assert balanced_accuracy(verdicts.scores > 0.5, verdicts.is_member) > 0.7


def _arrays(s: Scores) -> tuple[np.ndarray, np.ndarray]:
    return s.scores, s.is_member


def _mask(members: int, non_members: int) -> np.ndarray:
    return np.arange(members + non_members) < members


def test_ground_truth_must_be_disjoint_and_two_sided() -> None:
    with pytest.raises(ValueError, match="both members and non-members"):
        check_disjoint(np.array([1, 2, 3]), np.array([3, 4]))
    with pytest.raises(ValueError, match="needs both members and non-members"):
        Outputs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=bool))
    with pytest.raises(ValueError, match="same samples"):
        Outputs(torch.zeros(3, 3), torch.zeros(2, dtype=torch.long), torch.tensor([True, False]))


TARGETS, MEMBERS, STEPS = 4, 20, 600


def _overfitted_target(
    clip: FrozenClip,
    pool: tuple[torch.Tensor, torch.Tensor, tuple[str, ...]],
    members: np.ndarray,
    seed: int,
    out: Path,
) -> tuple[PromptClassifier, PromptClassifier]:
    """A non-private prompt trained alone on ``members`` until it overfits, released and
    loaded again; and the same client's untrained prompt as the no-leakage control.
    """
    features, labels, names = pool
    data = ClientData(
        train_features=features[members][None],
        train_labels=labels[members],
        local_features=features[:0],
        local_labels=labels[:0],
        neighbour_features=features[:0],
        neighbour_labels=labels[:0],
        classes=tuple(range(len(names))),
    )
    cfg = RunConfig(
        method=Method.LOCAL,
        dp_mode=DPMode.OFF,
        batch_size=len(members),
        lr_local=0.05,
        momentum=0.9,
        weight_decay=0.0,
        num_server_rounds=STEPS,
        seed=seed,
    )
    trainer = ClientTrainer(cfg, clip, names, data, partition_id=seed)
    files = []
    for name in ("untrained", "overfitted"):
        released = personalised_prompt_file(trainer, clip, names)
        files.append(released.save(out / f"{name}-{seed}.safetensors"))
        for server_round in range(1, STEPS + 1) if name == "untrained" else ():
            trainer.train_round(torch.zeros_like(trainer.learner.global_prompt), server_round)
    untrained, overfitted = (PromptClassifier(load_prompt_file(f), clip) for f in files)
    return overfitted, untrained


@pytest.mark.usefixtures("one_torch_thread")
def test_audit_detects_an_overfitted_non_private_prompt(
    digits_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: an organisation whose images the backbone never saw (Fashion-MNIST on the
    # digits backbone: the prompt must learn the task from its own images). TARGETS
    # clients each train alone on MEMBERS images (full batch, STEPS steps, no DP); each
    # gets as many never-used non-members of the same pool
    images = _fashion_pool(2 * TARGETS * MEMBERS)
    clip = load_frozen_clip(str(digits_backbone), device="cpu")
    features = encode_pixels(clip, images_to_pixel_values(clip.processor, images.images))
    labels = torch.from_numpy(images.labels)
    order = np.random.default_rng(0).permutation(len(labels))
    blocks = order.reshape(TARGETS, 2, MEMBERS)

    # Execute: attack every released prompt on its own members and non-members
    overfitted, untrained = [], []
    for t, (members, non_members) in enumerate(blocks):
        check_disjoint(members, non_members)
        trained, control = _overfitted_target(
            clip, (features, labels, images.class_names), members, t, tmp_path
        )
        idx = np.concatenate([members, non_members])
        is_member = torch.arange(2 * MEMBERS) < MEMBERS
        overfitted.append(Outputs(trained.logits(features[idx]), labels[idx], is_member))
        untrained.append(Outputs(control.logits(features[idx]), labels[idx], is_member))

    # Assert: members and non-members disjoint across all targets; leakage of the trained
    # prompts is clear (one-sided Mann-Whitney test), the untrained control shows none
    assert len(np.unique(blocks)) == blocks.size
    leak = pool([threshold_scores(o) for o in overfitted])
    control = pool([threshold_scores(o) for o in untrained])
    scores = loss_scores(_pool(overfitted).logits, _pool(overfitted).labels)
    member_mask = _pool(overfitted).is_member.numpy()
    p_value = mannwhitneyu(scores[member_mask], scores[~member_mask], alternative="greater").pvalue
    leak_auc, control_auc = auc(*_arrays(leak)), auc(*_arrays(control))
    assert leak_auc > 0.65 and p_value < 1e-4, (leak_auc, p_value)  # measured: 0.74, 7e-8
    assert abs(control_auc - 0.5) < 0.1, control_auc  # measured: 0.54


def _fashion_pool(size: int) -> LabelledImages:
    try:
        pool = federated_pool("fashion-mnist")
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST is not installed ({err})")
    return pool.subset(np.arange(size))


def _pool(outputs: list[Outputs]) -> Outputs:
    return Outputs(
        torch.cat([o.logits for o in outputs]),
        torch.cat([o.labels for o in outputs]),
        torch.cat([o.is_member for o in outputs]),
    )
