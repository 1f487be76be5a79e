"""PromptLearner (DP-FPL and every baseline as configurations) and the ClientTrainer around it."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.stats import chi2
from torch import Tensor

from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip
from dpfpl_app.config import DPMode, Method, RunConfig
from dpfpl_app.data.federated_data import ClientData
from dpfpl_app.federation.strategy_build import initial_prompt
from dpfpl_app.method.client_trainer import BudgetError, ClientTrainer
from dpfpl_app.method.prompt_learner import LearnerSettings, PromptLearner
from dpfpl_app.method.text_encoder import CoOpTextEncoder, template_context
from dpfpl_app.privacy.noise import NoiseSource

CLASS_NAMES = ("cat", "dog", "hippopotamus", "great white shark", "sea lion pup", "owl")
N_CTX, RANK, BATCH = 4, 2, 4
TRAINED = [m for m in Method if m is not Method.ZEROSHOT]
FALSE_ALARM = 1e-6  # two-sided probability that a correct noise std fails the chi2 test


class Setup(NamedTuple):
    clip: FrozenClip
    encoders: dict[int, CoOpTextEncoder]  # by n_ctx

    @property
    def width(self) -> int:
        return self.clip.text_width

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.model.logit_scale.exp().detach()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(plumbing_clip: Path) -> Setup:
    clip = load_frozen_clip(str(plumbing_clip), device="cpu")
    encoders = {n: CoOpTextEncoder(clip.model, clip.tokenizer, CLASS_NAMES, n) for n in (N_CTX, 16)}
    return Setup(clip, encoders)


def _settings(method: Method, dp_mode: DPMode = DPMode.OFF, **overrides: object) -> LearnerSettings:
    values: dict[str, object] = {
        "method": method, "n_ctx": N_CTX, "rank": RANK, "init_std": 0.02, "lr": 0.5,
        "momentum": 0.0, "weight_decay": 0.0, "dp_mode": dp_mode, "clip_norm": 1.0,
        "local_noise_multiplier": 0.0,
    }
    values.update(overrides)
    return LearnerSettings(**values)  # type: ignore[arg-type]


def _learner(
    setup: Setup, settings: LearnerSettings, seed: int = 0, **kwargs: object
) -> PromptLearner:
    return PromptLearner(
        setup.encoders[settings.n_ctx], setup.logit_scale, settings,
        generator=torch.Generator().manual_seed(seed), width=setup.width, **kwargs,  # type: ignore[arg-type]
    )


def _batch(setup: Setup, size: int = BATCH, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = int(setup.clip.model.config.projection_dim)
    features = F.normalize(torch.randn(size, embed, generator=g), dim=-1)
    return features, torch.randint(0, len(CLASS_NAMES), (size,), generator=g)


def _plain_gradient(
    setup: Setup, n_ctx: int, prompt: Tensor, batch: tuple[Tensor, Tensor]
) -> Tensor:
    """Autograd gradient of the batch-mean CoOp loss at ``prompt`` (the textbook CoOp)."""
    x = prompt.detach().clone().requires_grad_(True)
    features, labels = batch
    logits = setup.logit_scale * features @ setup.encoders[n_ctx](x).T
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), x)
    return grad


def _projector(a: Tensor) -> Tensor:
    """Orthogonal projector onto the column space of ``a`` (float64, via the pseudo-inverse)."""
    a = a.double()
    return a @ torch.linalg.pinv(a)


def _rel_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def _random_global(setup: Setup, n_ctx: int = N_CTX, seed: int = 9) -> Tensor:
    return torch.randn(n_ctx, setup.width, generator=torch.Generator().manual_seed(seed)) * 0.3


# --- DP off == plain training ------------------------------------------------------------------
NO_CLIP_NO_NOISE = [
    pytest.param({"dp_mode": DPMode.OFF}, id="off"),
    pytest.param({"dp_mode": DPMode.PER_SAMPLE, "clip_norm": 1e9}, id="per-sample-unclipped"),
    pytest.param({"dp_mode": DPMode.PAPER, "clip_norm": 1e9}, id="paper-unclipped"),
]


@pytest.mark.parametrize("mode", NO_CLIP_NO_NOISE)
def test_promptfl_without_clipping_or_noise_returns_the_plain_gradient(
    setup: Setup, mode: dict[str, object]
) -> None:
    # Prepare
    learner = _learner(setup, _settings(Method.PROMPTFL, **mode))  # type: ignore[arg-type]
    global_prompt = _random_global(setup)
    learner.set_global_prompt(global_prompt)
    batch = _batch(setup)
    expected = _plain_gradient(setup, N_CTX, global_prompt, batch)

    # Execute
    result = learner.train_step(*batch, expected_batch=BATCH)

    # Assert: the shared gradient is the plain one; nothing private exists or changes
    assert result.global_grad is not None
    assert _rel_error(result.global_grad, expected) < 1e-4
    assert result.local_noise_std == 0.0 and learner.private_state() == {}
    assert torch.equal(learner.personalised_prompt(), global_prompt)


def test_per_sample_sums_are_divided_by_the_expected_not_the_drawn_batch(setup: Setup) -> None:
    # Prepare: Poisson sampling drew 4 samples where 8 were expected (q |D| = 8)
    settings = _settings(Method.PROMPTFL, DPMode.PER_SAMPLE, clip_norm=1e9)
    learner = _learner(setup, settings)
    global_prompt = _random_global(setup)
    learner.set_global_prompt(global_prompt)
    batch = _batch(setup, size=4)
    plain = _plain_gradient(setup, N_CTX, global_prompt, batch)

    # Execute
    result = learner.train_step(*batch, expected_batch=8.0)

    # Assert: sum of 4 per-sample gradients / 8 = half the drawn batch's mean gradient
    assert result.global_grad is not None
    assert _rel_error(result.global_grad, 0.5 * plain) < 1e-4


@pytest.mark.parametrize("mode", NO_CLIP_NO_NOISE)
def test_dpfpl_local_update_is_the_true_gradient_projected_on_the_carriers(
    setup: Setup, mode: dict[str, object]
) -> None:
    # Prepare: replay the learner's generator to rebuild the carrier subspaces independently
    lr = 0.5
    learner = _learner(setup, _settings(Method.DPFPL, lr=lr, **mode))  # type: ignore[arg-type]
    global_prompt = _random_global(setup)
    learner.set_global_prompt(global_prompt)
    p_local = learner.private_state()["local_prompt"]
    replay = torch.Generator()
    replay.set_state(learner.generator.get_state())
    v0 = torch.randn(setup.width, RANK, generator=replay)  # the power iteration's start
    p_u = _projector(p_local @ v0)  # span(u) = span(p_L v0)
    p_v = _projector(p_local.T @ p_local @ v0)  # rowspan(v) = span(p_L^T u)
    batch = _batch(setup)
    g = _plain_gradient(setup, N_CTX, global_prompt + p_local, batch).double()

    # Execute
    result = learner.train_step(*batch, expected_batch=BATCH)

    # Assert: p_L moved by -lr (P_u g + g P_v - P_u g P_v); p_G's gradient is g itself
    update = learner.private_state()["local_prompt"] - p_local
    expected = -lr * (p_u @ g + g @ p_v - p_u @ g @ p_v)
    assert _rel_error(update, expected) < 1e-3
    # the update is far from the unprojected step: the projection is really applied
    assert _rel_error(update, -lr * g) > 0.1
    assert result.global_grad is not None and _rel_error(result.global_grad, g) < 1e-4


def test_local_coop_without_dp_follows_torch_sgd_with_momentum(setup: Setup) -> None:
    # Prepare: the authors' optimiser (SGD, momentum 0.9, weight decay 5e-4) from torch
    settings = _settings(Method.LOCAL, lr=0.3, momentum=0.9, weight_decay=5e-4)
    learner = _learner(setup, settings)
    reference = torch.nn.Parameter(learner.private_state()["local_prompt"])
    optimiser = torch.optim.SGD([reference], lr=0.3, momentum=0.9, weight_decay=5e-4)
    encoder = setup.encoders[N_CTX]

    for step in range(3):
        features, labels = _batch(setup, seed=step)
        optimiser.zero_grad()
        F.cross_entropy(setup.logit_scale * features @ encoder(reference).T, labels).backward()
        optimiser.step()

        # Execute
        result = learner.train_step(features, labels, expected_batch=BATCH)

        # Assert
        assert result.global_grad is None
        assert _rel_error(learner.private_state()["local_prompt"], reference.detach()) < 1e-5


# --- noise ---------------------------------------------------------------------------------------
def _chi2_std_bounds(samples: int, p: float = FALSE_ALARM) -> tuple[float, float]:
    """Bounds on s/sigma for ``samples`` zero-mean normal draws: k s^2 / sigma^2 ~ chi2(k)."""
    return (math.sqrt(chi2.ppf(p / 2, samples) / samples),
            math.sqrt(chi2.ppf(1 - p / 2, samples) / samples))


@pytest.mark.parametrize(
    ("method", "dp_mode", "tensors"),
    [
        (Method.DPFPL, DPMode.PER_SAMPLE, 2),  # carriers du, dv: sensitivity sqrt(2) C / B
        (Method.FEDOTP, DPMode.PER_SAMPLE, 1),  # one full-rank local gradient: C / B
        (Method.DPFPL, DPMode.PAPER, 1),  # paper: z C / B on each tensor
    ],
)
def test_local_noise_has_the_calibrated_std(
    setup: Setup, method: Method, dp_mode: DPMode, tensors: int
) -> None:
    # Prepare: rank = n_ctx = 16, so u is square orthogonal and Eq. 4 reduces to u dv: the
    # Frobenius norm of the difference between a noisy and a noiseless learner (identical
    # state, identical generator) is lr * ||noise on dv|| (FedOTP: lr * ||noise||).
    # 3 independent steps x 16 x 128 = 6144 draws: the two-sided 1e-6 chi2 band puts s/sigma
    # within about +-5%, far tighter than a sqrt(2) or a 1/B mistake.
    n_ctx, lr, clip, z, expected_batch = 16, 0.25, 0.5, 1.3, 8.0
    noisy = _settings(method, dp_mode, n_ctx=n_ctx, rank=n_ctx, lr=lr, clip_norm=clip,
                      local_noise_multiplier=z)
    clean = replace(noisy, local_noise_multiplier=0.0)
    calibrated = z * math.sqrt(tensors) * clip / expected_batch
    squares, count = 0.0, 0
    for trial in range(3):
        a, b = _learner(setup, noisy, seed=trial), _learner(setup, clean, seed=trial)
        a.generator.manual_seed(100 + trial)
        b.generator.manual_seed(100 + trial)
        a.noise = NoiseSource.public_seed(100 + trial)
        batch = _batch(setup, seed=trial)

        # Execute
        reported = a.train_step(*batch, expected_batch=expected_batch).local_noise_std
        b.train_step(*batch, expected_batch=expected_batch)

        diff = (a.private_state()["local_prompt"] - b.private_state()["local_prompt"]) / lr
        squares += float(diff.double().pow(2).sum())
        count += diff.numel()
        assert reported == pytest.approx(calibrated, rel=1e-12)

    # Assert
    low, high = _chi2_std_bounds(count)
    ratio = math.sqrt(squares / count) / calibrated
    assert low < ratio < high, (low, ratio, high)


def test_dpfpl_noise_stays_in_the_carrier_subspaces_and_never_touches_the_residual(
    setup: Setup,
) -> None:
    # Prepare: noisy and noiseless learners with identical state and generator
    noisy = _settings(Method.DPFPL, DPMode.PER_SAMPLE, local_noise_multiplier=2.0)
    a, b = _learner(setup, noisy), _learner(setup, replace(noisy, local_noise_multiplier=0.0))
    p_local = a.private_state()["local_prompt"]
    replay = torch.Generator()
    replay.set_state(a.generator.get_state())
    v0 = torch.randn(setup.width, RANK, generator=replay)
    p_u, p_v = _projector(p_local @ v0), _projector(p_local.T @ p_local @ v0)
    batch = _batch(setup)

    # Execute
    a.train_step(*batch, expected_batch=BATCH)
    b.train_step(*batch, expected_batch=BATCH)

    # Assert: the noise is visible, and (I - P_u) noise (I - P_v) = 0
    noise = (a.private_state()["local_prompt"] - b.private_state()["local_prompt"]).double()
    eye_n = torch.eye(N_CTX, dtype=torch.float64)
    eye_d = torch.eye(setup.width, dtype=torch.float64)
    outside = (eye_n - p_u) @ noise @ (eye_d - p_v)
    assert float(noise.norm()) > 1e-3
    assert float(outside.norm()) < 1e-5 * float(noise.norm())


# --- learning works ---------------------------------------------------------------------------
def test_non_private_training_learns_a_separable_toy_problem(setup: Setup) -> None:
    # Prepare: image features = noised, normalised text features of the classes under a
    # hidden random prompt, so a prompt reaching ~Bayes accuracy exists (measured 0.995)
    encoder = setup.encoders[N_CTX]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        targets = encoder(torch.randn(N_CTX, setup.width, generator=g))  # (C, e)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, len(CLASS_NAMES), (n,), generator=g)
        noise = 0.07 * torch.randn(n, targets.shape[1], generator=g)
        return F.normalize(targets[labels] + noise, dim=-1), labels

    test_x, test_y = draw(600)
    batches = [draw(32) for _ in range(100)]
    runs = {
        "dpfpl": _settings(Method.DPFPL, lr=1.0, momentum=0.9),
        "local": _settings(Method.LOCAL, lr=0.5, momentum=0.9),
    }
    for name, settings in runs.items():
        learner = _learner(setup, settings, seed=2)
        start = float((learner.logits(test_x).argmax(1) == test_y).float().mean())

        # Execute
        losses = [learner.train_step(x, y, expected_batch=32).loss for x, y in batches]

        # Assert: measured 0.978 (dpfpl) and 0.982 (local), from 0.778 at initialisation
        accuracy = float((learner.logits(test_x).argmax(1) == test_y).float().mean())
        assert accuracy >= 0.9, (name, start, accuracy)
        assert accuracy >= start + 0.1, (name, start, accuracy)
        assert sum(losses[-10:]) < sum(losses[:10]), name


# --- every configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("dp_mode", list(DPMode))
@pytest.mark.parametrize("method", TRAINED)
def test_every_method_and_dp_mode_trains_and_shares_iff_it_has_a_global_prompt(
    setup: Setup, method: Method, dp_mode: DPMode
) -> None:
    # Prepare
    z = 0.0 if dp_mode is DPMode.OFF else 1.0
    learner = _learner(setup, _settings(method, dp_mode, local_noise_multiplier=z))
    learner.set_global_prompt(_random_global(setup))
    before = learner.private_state()

    # Execute
    results = [learner.train_step(*_batch(setup, seed=s), expected_batch=BATCH) for s in range(2)]

    # Assert
    after = learner.private_state()
    for result in results:
        assert (result.global_grad is not None) is method.has_global
        if result.global_grad is not None:
            assert result.global_grad.shape == (N_CTX, setup.width)
            assert torch.isfinite(result.global_grad).all()
            if dp_mode is not DPMode.OFF:
                assert float(result.global_grad.norm()) <= 1.0 + 1e-5  # clip norm C = 1
        assert (result.local_noise_std > 0) is (dp_mode is not DPMode.OFF and method.has_local)
        assert math.isfinite(result.loss) and result.batch_size == BATCH
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before) is method.has_local
    prompt = learner.personalised_prompt()
    assert prompt.shape == (N_CTX, setup.width) and torch.isfinite(prompt).all()


def test_zeroshot_predicts_with_the_template_and_refuses_to_train(setup: Setup) -> None:
    # Prepare
    template = torch.randn(3, setup.width)
    settings = _settings(Method.ZEROSHOT, n_ctx=3)
    learner = PromptLearner(
        CoOpTextEncoder(setup.clip.model, setup.clip.tokenizer, CLASS_NAMES, 3), setup.logit_scale,
        settings, generator=torch.Generator().manual_seed(0), width=setup.width,
        template_context=template,
    )

    # Execute / Assert
    assert torch.equal(learner.personalised_prompt(), template)
    assert learner.logits(_batch(setup)[0]).shape == (BATCH, len(CLASS_NAMES))
    with pytest.raises(ValueError, match="'zeroshot' trains nothing"):
        learner.train_step(*_batch(setup), expected_batch=BATCH)


def test_zeroshot_without_template_raises(setup: Setup) -> None:
    with pytest.raises(ValueError, match="'zeroshot' needs the embedded template words"):
        _learner(setup, _settings(Method.ZEROSHOT))


@pytest.mark.parametrize("method", [Method.DPFPL, Method.DPLORA, Method.FEDPGP])
@pytest.mark.parametrize("rank", [0, N_CTX + 1])
def test_rank_out_of_range_raises_naming_rank(setup: Setup, method: Method, rank: int) -> None:
    with pytest.raises(ValueError, match=rf"rank={rank} must be in \[1, min\(n-ctx={N_CTX}"):
        _learner(setup, _settings(method, rank=rank))


def test_global_prompt_of_the_wrong_shape_raises(setup: Setup) -> None:
    learner = _learner(setup, _settings(Method.DPFPL))
    with pytest.raises(ValueError, match=r"has shape \(5, 128\), expected \(4, 128\)"):
        learner.set_global_prompt(torch.zeros(5, 128))


@pytest.mark.parametrize("method", [Method.DPFPL, Method.PROMPTFL])
def test_empty_poisson_batch_in_per_sample_mode_still_steps(setup: Setup, method: Method) -> None:
    # Prepare: Poisson sampling can draw no sample at all
    learner = _learner(setup, _settings(method, DPMode.PER_SAMPLE, local_noise_multiplier=1.0))
    empty = (torch.zeros(0, int(setup.clip.model.config.projection_dim)), torch.zeros(0).long())

    # Execute
    result = learner.train_step(*empty, expected_batch=BATCH)

    # Assert: nothing learned from data, shapes intact, the shared gradient is zero
    assert result.batch_size == 0 and math.isnan(result.loss)
    assert result.global_grad is not None
    assert torch.equal(result.global_grad, torch.zeros(N_CTX, 128))
    assert all(v.shape[-2:] in {(N_CTX, 128), (N_CTX, RANK), (RANK, 128)}
               for v in learner.private_state().values())


@pytest.mark.parametrize("dp_mode", [DPMode.OFF, DPMode.PAPER])
def test_empty_batch_without_per_sample_mode_keeps_shapes(setup: Setup, dp_mode: DPMode) -> None:
    # Prepare
    learner = _learner(setup, _settings(Method.FEDOTP, dp_mode))
    empty = (torch.zeros(0, int(setup.clip.model.config.projection_dim)), torch.zeros(0).long())

    # Execute
    result = learner.train_step(*empty, expected_batch=BATCH)

    # Assert
    assert result.global_grad is not None and result.global_grad.shape == (N_CTX, 128)
    assert learner.private_state()["local_prompt"].shape == (N_CTX, 128)


# --- private state --------------------------------------------------------------------------------
def _trained_learner(setup: Setup, method: Method, seed: int = 0) -> PromptLearner:
    """Build a learner with two momentum steps behind it (so optimiser state matters)."""
    settings = _settings(method, DPMode.PER_SAMPLE, momentum=0.9, local_noise_multiplier=0.5)
    learner = _learner(setup, settings, seed=seed)
    learner.set_global_prompt(_random_global(setup))
    for s in range(2):
        learner.train_step(*_batch(setup, seed=s), expected_batch=BATCH)
    return learner


@pytest.mark.parametrize("method", TRAINED)
def test_private_state_round_trip_resumes_identically(setup: Setup, method: Method) -> None:
    # Prepare
    original = _trained_learner(setup, method)
    saved = original.private_state()

    # Execute: a learner initialised differently, restored from a copy of the state
    restored = _learner(setup, original.settings, seed=123)
    restored.set_global_prompt(original.global_prompt)
    restored.load_private_state({k: v.clone() for k, v in saved.items()})

    # Assert: same state, same prediction, and the next step is identical
    assert set(restored.private_state()) == set(saved)
    assert all(torch.equal(restored.private_state()[k], saved[k]) for k in saved)
    assert torch.equal(restored.personalised_prompt(), original.personalised_prompt())
    original.generator.manual_seed(7)
    restored.generator.manual_seed(7)
    original.noise, restored.noise = NoiseSource.public_seed(7), NoiseSource.public_seed(7)
    batch = _batch(setup, seed=5)
    a = original.train_step(*batch, expected_batch=BATCH)
    b = restored.train_step(*batch, expected_batch=BATCH)
    assert a.loss == b.loss
    assert all(torch.equal(original.private_state()[k], restored.private_state()[k]) for k in saved)




@pytest.mark.parametrize("method", TRAINED)
def test_private_state_round_trip_through_safetensors_on_disk(
    setup: Setup, method: Method, tmp_path: Path
) -> None:
    # Prepare: the node keeps its private state in a safetensors file (client_node.save_state)
    original = _trained_learner(setup, method)
    path = tmp_path / "private.safetensors"

    # Execute
    save_file(original.private_state(), path)
    restored = _learner(setup, original.settings, seed=123)
    restored.load_private_state(load_file(path))

    # Assert
    saved = original.private_state()
    assert all(torch.equal(restored.private_state()[k], saved[k]) for k in saved)


def test_private_state_has_momentum_only_after_steps_with_momentum(setup: Setup) -> None:
    # Prepare
    learner = _learner(setup, _settings(Method.FEDPGP, momentum=0.9))

    # Execute
    learner.train_step(*_batch(setup), expected_batch=BATCH)

    # Assert
    assert set(learner.private_state()) == {"u", "v", "momentum.u", "momentum.v"}


@pytest.mark.parametrize(
    ("saved_by", "loaded_by"),
    [(Method.DPFPL, Method.FEDPGP), (Method.FEDPGP, Method.DPFPL), (Method.PROMPTFL, Method.LOCAL),
     (Method.DPLORA, Method.DPFPL)],
)
def test_loading_another_methods_state_fails_clearly(
    setup: Setup, saved_by: Method, loaded_by: Method
) -> None:
    # Prepare
    state = _learner(setup, _settings(saved_by)).private_state()
    target = _learner(setup, _settings(loaded_by))

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"method '{loaded_by.value}' needs .*another method"):
        target.load_private_state(state)


def test_loading_state_of_another_shape_fails_clearly(setup: Setup) -> None:
    # Prepare: saved with n_ctx 16, loaded with n_ctx 4
    state = _learner(setup, _settings(Method.FEDOTP, n_ctx=16)).private_state()
    target = _learner(setup, _settings(Method.FEDOTP))

    # Execute / Assert
    message = r"'local_prompt' has shape \(16, 128\), expected \(4, 128\).*n-ctx, rank or backbone"
    with pytest.raises(ValueError, match=message):
        target.load_private_state(state)


# --- ClientTrainer: the learner, its data, sampling and its budget ------------------------------
def _config(**overrides: object) -> RunConfig:
    values: dict[str, object] = {
        "n-ctx": N_CTX, "rank": RANK, "batch-size": 8, "num-server-rounds": 3, "local-steps": 2,
        "dp-mode": "per-sample", "epsilon": 4.0, "momentum": 0.0, "seed": 0,
        "reproducible-noise": True,  # deterministic test; the warning it raises is intended
    }
    values.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RunConfig.from_flower(values)


def _client_data(setup: Setup, num_train: int) -> ClientData:
    features, labels = _batch(setup, size=num_train + 12, seed=11)
    return ClientData(
        train_features=features[None, :num_train], train_labels=labels[:num_train],
        local_features=features[num_train : num_train + 6],
        local_labels=labels[num_train : num_train + 6],
        neighbour_features=features[num_train + 6 :], neighbour_labels=labels[num_train + 6 :],
        classes=tuple(range(len(CLASS_NAMES))),
    )


def _trainer(setup: Setup, cfg: RunConfig, num_train: int = 20) -> ClientTrainer:
    return ClientTrainer(cfg, setup.clip, CLASS_NAMES, _client_data(setup, num_train),
                         partition_id=0)


def test_client_spends_its_budget_over_the_planned_steps_and_refuses_more(setup: Setup) -> None:
    # Prepare: no declared rate: q = the bound 0.5, T = 3 rounds x 2 local steps
    cfg = _config()
    trainer = _trainer(setup, cfg)
    prompt = torch.zeros(N_CTX, setup.width)

    # Execute
    outcomes = [trainer.train_round(prompt, r) for r in range(1, 4)]

    # Assert: every step is counted; the run ends just under its target
    assert trainer.steps_taken == 6 and trainer.sample_rate == 0.5
    assert 0.9 * cfg.epsilon <= outcomes[-1].epsilon <= cfg.epsilon
    assert outcomes[0].epsilon < outcomes[1].epsilon < outcomes[2].epsilon
    with pytest.raises(BudgetError, match="all 6 steps its privacy budget covers"):
        trainer.train_round(prompt, 4)


def test_client_refuses_a_round_it_already_trained(setup: Setup) -> None:
    # Prepare: a server resumed from an older checkpoint asks for round 2 again
    trainer = _trainer(setup, _config())
    prompt = torch.zeros(N_CTX, setup.width)
    for r in (1, 2):
        trainer.train_round(prompt, r)

    # Execute / Assert: refused, and nothing was spent
    with pytest.raises(BudgetError, match="already trained round 2.*resume from the latest"):
        trainer.train_round(prompt, 2)
    assert trainer.steps_taken == 4


def test_client_rate_never_exceeds_the_public_bound(setup: Setup) -> None:
    # a client declaring nothing samples at the bound, still dividing by B; a declared
    # rate above the bound is refused before anything is trained
    cfg = _config(**{"max-sample-rate": 0.1})
    trainer = _trainer(setup, cfg, num_train=20)
    assert trainer.sample_rate == 0.1 and trainer._expected_batch() == 8.0
    with pytest.raises(ValueError, match=r"sample-rate.*above the run's bound max-sample-rate"):
        ClientTrainer(cfg, setup.clip, CLASS_NAMES, _client_data(setup, 20), partition_id=0,
                      sample_rate=0.4)


def test_client_of_a_method_that_shares_nothing_sends_zeros(setup: Setup) -> None:
    # Prepare
    trainer = _trainer(setup, _config(method="local", **{"dp-mode": "off"}))
    before = trainer.learner.private_state()["local_prompt"]

    # Execute
    outcome = trainer.train_round(torch.zeros(N_CTX, setup.width), 1)

    # Assert: it trained its own prompt, and shares nothing
    assert torch.equal(outcome.global_grad, torch.zeros(N_CTX, setup.width))
    assert not torch.equal(trainer.learner.private_state()["local_prompt"], before)
    # a local prompt trained on the data without noise has no privacy guarantee at all
    assert math.isinf(outcome.epsilon)


def test_promptfl_puts_all_of_the_noise_on_the_global_channel(setup: Setup) -> None:
    trainer = _trainer(setup, _config(method="promptfl"))

    outcome = trainer.train_round(torch.zeros(N_CTX, setup.width), 1)

    plan = trainer.plan
    assert plan.z_local == 0.0 and plan.z_global == pytest.approx(plan.z_step / math.sqrt(2))
    assert outcome.epsilon == plan.epsilon(2) > 0


def test_client_state_round_trip_restores_prompt_and_budget_counters(setup: Setup) -> None:
    # Prepare: the same config as above, so the calibrated noise comes from the cache
    cfg = _config()
    original = _trainer(setup, cfg)
    original.train_round(torch.zeros(N_CTX, setup.width), 1)
    tensors, meta = original.state_dict()

    # Execute: through JSON, as the node stores the metadata
    restored = _trainer(setup, cfg)
    restored.load_state_dict({k: v.clone() for k, v in tensors.items()},
                             json.loads(json.dumps(meta)))

    # Assert
    assert (restored.rounds_done, restored.last_round, restored.steps_taken) == (1, 1, 2)
    assert restored.epsilon() == original.epsilon() > 0
    saved = original.learner.private_state()
    assert all(torch.equal(restored.learner.private_state()[k], v) for k, v in saved.items())


def test_client_refuses_state_saved_by_another_method(setup: Setup) -> None:
    # Prepare
    tensors, meta = _trainer(setup, _config(method="fedotp", **{"dp-mode": "off"})).state_dict()
    target = _trainer(setup, _config(method="dpfpl", **{"dp-mode": "off"}))

    # Execute / Assert
    with pytest.raises(ValueError, match="saved client state is for method 'fedotp', this run "
                       "uses 'dpfpl'"):
        target.load_state_dict(tensors, meta)


def test_client_refuses_state_trained_under_the_other_aggregation(setup: Setup) -> None:
    # Prepare: one run's budget counted under secure aggregation (dp off: no calibration)
    secure = _config(**{"dp-mode": "off", "aggregation": "secure", "min-nodes": 3})
    tensors, meta = _trainer(setup, secure).state_dict()
    plain = _trainer(setup, _config(**{"dp-mode": "off", "aggregation": "plain"}))

    # Execute / Assert
    assert meta["aggregation"] == "secure"
    with pytest.raises(ValueError, match="trained with aggregation 'secure', this message asks "
                       "for 'plain'"):
        plain.load_state_dict(tensors, meta)


def test_zeroshot_client_uses_the_template_words_and_evaluates(setup: Setup) -> None:
    # Prepare
    ids = setup.clip.tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    table = setup.clip.model.text_model.embeddings.token_embedding.weight

    # Execute
    trainer = _trainer(setup, _config(method="zeroshot"))
    metrics = trainer.evaluate(torch.zeros(len(ids), setup.width))

    # Assert
    assert torch.equal(trainer.learner.personalised_prompt(), table[torch.tensor(ids)])
    assert 0.0 <= metrics["local-acc"] <= 1.0 and metrics["local-examples"] == 6.0
    with pytest.raises(ValueError, match="zeroshot-template ' ' has no tokens"):
        template_context(setup.clip, " ")


def test_small_client_with_poisson_sampling_completes_its_rounds(setup: Setup) -> None:
    # Prepare: 3 images, batch size 1 -> q = 1/3: each step draws nothing with prob (2/3)^3
    # = 0.30, so 20 seeded steps include an empty draw (probability 0.999)
    trainer = _trainer(setup, _config(**{"batch-size": 1, "local-steps": 20}), num_train=3)

    # Execute
    outcome = trainer.train_round(torch.zeros(N_CTX, setup.width), 1)

    # Assert
    assert torch.isfinite(outcome.global_grad).all()
    assert trainer.steps_taken == 20


# --- ctx-init: the prompt starts from words ----------------------------------------------------
def _ctx_init_config(plumbing_clip: Path, method: str, n_ctx: int) -> RunConfig:
    return _config(**{
        "method": method, "n-ctx": n_ctx, "rank": 1, "model": str(plumbing_clip),
        "ctx-init": "a photo of a",
    })


@pytest.mark.parametrize("method", ["promptfl", "local"])
def test_ctx_init_untrained_predicts_exactly_as_zeroshot(
    setup: Setup, plumbing_clip: Path, method: str
) -> None:
    # Prepare: n-ctx = the template's token count, so the prompt is the zero-shot sentence
    k = len(setup.clip.tokenizer("a photo of a", add_special_tokens=False)["input_ids"])
    cfg = _ctx_init_config(plumbing_clip, method, k)
    trainer = _trainer(setup, cfg)
    zeroshot = _trainer(setup, _config(method="zeroshot"))
    features = _client_data(setup, 20).local_features

    # Execute
    trainer._receive(initial_prompt(cfg))
    learned, reference = trainer.learner.logits(features), zeroshot.learner.logits(features)

    # Assert
    torch.testing.assert_close(learned, reference, atol=1e-5, rtol=1e-5)
    assert trainer.evaluate(initial_prompt(cfg)) == zeroshot.evaluate(torch.zeros(k, setup.width))


def test_ctx_init_fills_the_first_rows_and_keeps_the_random_rest(
    setup: Setup, plumbing_clip: Path
) -> None:
    # Prepare
    words = template_context(setup.clip, "a photo of a")
    k = words.shape[0]

    # Execute
    with_words = initial_prompt(_ctx_init_config(plumbing_clip, "dpfpl", 16))
    random = initial_prompt(_config(**{"n-ctx": 16, "rank": 1, "model": str(plumbing_clip)}))

    # Assert
    assert torch.equal(with_words[:k], words)
    assert torch.equal(with_words[k:], random[k:])
    assert not torch.equal(with_words[:k], random[:k])


def test_ctx_init_longer_than_n_ctx_names_both(setup: Setup, plumbing_clip: Path) -> None:
    k = len(setup.clip.tokenizer("a photo of a", add_special_tokens=False)["input_ids"])
    cfg = _ctx_init_config(plumbing_clip, "local", k - 1)
    message = rf"ctx-init='a photo of a' is {k} tokens but n-ctx={k - 1}"
    with pytest.raises(ValueError, match=message):
        _trainer(setup, cfg)
    with pytest.raises(ValueError, match="raise n-ctx"):
        initial_prompt(_ctx_init_config(plumbing_clip, "promptfl", k - 1))
