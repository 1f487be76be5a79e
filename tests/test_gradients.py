"""prompt_gradients: vmap-over-VJP per-sample gradients against a naive autograd loop."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip
from dpfpl_app.method.gradients import prompt_gradients
from dpfpl_app.method.text_encoder import CoOpTextEncoder

CLASS_NAMES = ("cat", "dog", "great white shark", "owl")
N_CTX, BATCH = 3, 6


class Problem(NamedTuple):
    encoder: CoOpTextEncoder
    text_model: nn.Module
    prompt: Tensor  # (n_ctx, d)
    features: Tensor  # (B, e), normalised
    labels: Tensor  # (B,)
    logit_scale: Tensor  # exponentiated


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem(plumbing_clip: Path) -> Problem:
    """Build the encoder, a prompt and a batch whose labels cover every class."""
    clip: FrozenClip = load_frozen_clip(str(plumbing_clip), device="cpu")
    g = torch.Generator().manual_seed(0)
    encoder = CoOpTextEncoder(clip.model, clip.tokenizer, CLASS_NAMES, N_CTX)
    width, embed = clip.text_width, int(clip.model.config.projection_dim)
    return Problem(
        encoder=encoder,
        text_model=clip.model.text_model,
        prompt=torch.randn(N_CTX, width, generator=g) * 0.5,
        features=F.normalize(torch.randn(BATCH, embed, generator=g), dim=-1),
        labels=torch.tensor([0, 1, 2, 3, 1, 0]),
        logit_scale=clip.model.logit_scale.exp().detach(),
    )


def _loss(p: Problem, prompt: Tensor, features: Tensor, labels: Tensor) -> Tensor:
    """CoOp loss through the reference 77-token path (transformers' own encoder)."""
    text = p.encoder.plain_features(prompt, p.text_model)  # (C, e)
    return F.cross_entropy(p.logit_scale * features @ text.T, labels)


def _naive_per_sample(p: Problem) -> tuple[Tensor, Tensor]:
    """One autograd backward per sample, in a Python loop."""
    grads, losses = [], []
    for j in range(BATCH):
        prompt = p.prompt.clone().requires_grad_(True)
        loss = _loss(p, prompt, p.features[j : j + 1], p.labels[j : j + 1])
        (grad,) = torch.autograd.grad(loss, prompt)
        grads.append(grad)
        losses.append(loss.detach())
    return torch.stack(grads), torch.stack(losses)


def _assert_rows_close(actual: Tensor, expected: Tensor, tol: float = 1e-4) -> None:
    """Each sample's gradient within ``tol`` relative L2 error (float32 round-off ~1e-6)."""
    error = (actual - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert (error < tol).all(), error


def _call(p: Problem, *, per_sample: bool, chunk_size: int = 16) -> tuple[Tensor, Tensor]:
    return prompt_gradients(
        p.encoder, p.prompt, p.features, p.labels, p.logit_scale,
        per_sample=per_sample, chunk_size=chunk_size,
    )


def test_per_sample_gradients_equal_a_naive_autograd_loop(problem: Problem) -> None:
    # Prepare
    expected_grads, expected_losses = _naive_per_sample(problem)

    # Execute
    grads, losses = _call(problem, per_sample=True)

    # Assert
    assert grads.shape == (BATCH, *problem.prompt.shape)
    _assert_rows_close(grads, expected_grads)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    # samples really differ, so a broadcast of one gradient could not pass
    assert not torch.allclose(grads[0], grads[1], rtol=1e-2)


def test_batch_mean_gradient_equals_mean_of_per_sample_gradients(problem: Problem) -> None:
    # Prepare: the mean of the naive loop, and autograd of the batch-mean loss
    expected_grads, _ = _naive_per_sample(problem)
    prompt = problem.prompt.clone().requires_grad_(True)
    loss = _loss(problem, prompt, problem.features, problem.labels)
    (mean_loss_grad,) = torch.autograd.grad(loss, prompt)

    # Execute
    grad, losses = _call(problem, per_sample=False)

    # Assert
    assert grad.shape == problem.prompt.shape and losses.shape == (BATCH,)
    _assert_rows_close(grad[None], expected_grads.mean(0)[None])
    _assert_rows_close(grad[None], mean_loss_grad[None])
    torch.testing.assert_close(losses.mean(), loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunk_size_does_not_change_per_sample_gradients(
    problem: Problem, chunk_size: int
) -> None:
    # Prepare
    reference, _ = _call(problem, per_sample=True, chunk_size=BATCH)

    # Execute
    grads, _ = _call(problem, per_sample=True, chunk_size=chunk_size)

    # Assert
    _assert_rows_close(grads, reference, tol=1e-5)


def test_prompt_gradients_leave_the_prompt_untouched(problem: Problem) -> None:
    # Prepare
    before = problem.prompt.clone()

    # Execute
    _call(problem, per_sample=True)

    # Assert
    assert torch.equal(problem.prompt, before)
    assert not problem.prompt.requires_grad
