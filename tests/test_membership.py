"""Membership-inference audit: the attacks' arithmetic, and that they detect real leakage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from dpfpl_app.audit.membership import (
    Outputs,
    ShadowAttack,
    check_disjoint,
    evaluate_scores,
    loss_scores,
    threshold_attack,
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


def test_roc_summary_of_perfect_reversed_and_uninformative_scores() -> None:
    is_member = np.array([1, 1, 1, 0, 0, 0])

    perfect = evaluate_scores(np.array([6.0, 5, 4, 3, 2, 1]), is_member)
    reversed_ = evaluate_scores(np.array([1.0, 2, 3, 4, 5, 6]), is_member)
    flat = evaluate_scores(np.zeros(6), is_member)

    assert (perfect.auc, perfect.accuracy, perfect.tpr_at_low_fpr) == (1.0, 1.0, 1.0)
    assert reversed_.auc == 0.0 and reversed_.tpr_at_low_fpr == 0.0
    assert (flat.auc, flat.accuracy) == (0.5, 0.5)
    assert (perfect.members, perfect.non_members) == (3, 3)


def test_threshold_attack_scores_lower_loss_as_member() -> None:
    leaky, blank = _synthetic(3.0, seed=0), _synthetic(0.0, seed=0)

    assert threshold_attack(leaky).auc > 0.8
    assert abs(threshold_attack(blank).auc - 0.5) < 0.1


def test_shadow_attack_transfers_from_shadows_to_the_target() -> None:
    shadows = [_synthetic(3.0, seed=s) for s in (1, 2, 3)]

    attack = ShadowAttack(seed=0).fit(shadows)

    assert attack.attack(_synthetic(3.0, seed=9)).auc > 0.8
    assert abs(attack.attack(_synthetic(0.0, seed=9)).auc - 0.5) < 0.12


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
    leak, control = threshold_attack(_pool(overfitted)), threshold_attack(_pool(untrained))
    scores = loss_scores(_pool(overfitted).logits, _pool(overfitted).labels)
    member_mask = _pool(overfitted).is_member.numpy()
    p_value = mannwhitneyu(scores[member_mask], scores[~member_mask], alternative="greater").pvalue
    assert leak.auc > 0.65 and p_value < 1e-4, (leak, p_value)  # measured: 0.74, 7e-8
    assert abs(control.auc - 0.5) < 0.1, control  # measured: 0.54


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
