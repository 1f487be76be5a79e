"""The headline metrics' arithmetic and the class-prior frontier (``method.accuracy``,
``method.class_prior``), on figures and logits whose answer is known.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpfpl_app.method.accuracy import all_class, harmonic_mean
from dpfpl_app.method.class_prior import prior_frontier


def test_harmonic_mean_and_all_class_accuracy_on_known_counts() -> None:
    assert harmonic_mean(0.9, 0.1) == pytest.approx(0.18)  # a prior's 0.9 / 0.1: low
    assert harmonic_mean(0.5, 0.5) == 0.5
    assert harmonic_mean(1.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    # 9 of 10 own-class images, 9 of 90 others: all-class 18 / 100
    assert all_class(9, 10, 9, 90) == pytest.approx(0.18)
    assert all_class(0, 0, 0, 0) is None


def _biased_hits(logits: torch.Tensor, labels: torch.Tensor, own: tuple[int, ...],
                 bias: float) -> int:
    """Correct predictions of zero-shot logits with ``bias`` added to the own classes."""
    shifted = logits.clone()
    if math.isinf(bias):
        shifted[:, [c for c in range(logits.shape[1]) if c not in own]] = -math.inf
    else:
        shifted[:, list(own)] += bias
    return int((shifted.argmax(dim=1) == labels).sum())


def test_a_bias_beats_zero_shot_where_zero_shot_leans_away_from_the_own_classes() -> None:
    # Prepare: 3 classes, the client holds class 0. Zero-shot sends 3 of its 4 own images
    # to class 1 by a small margin (0.5) and gets all 4 neighbour images right by a wide
    # one (3.0, 4.0); one neighbour image is wrong at any bias (label 2, logits favour 1)
    local = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.5, 0.0]])
    neighbour = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 4.0], [0.0, 3.0, 0.0],
                              [0.0, 0.0, 4.0], [0.0, 2.0, 1.0]])
    local_labels = torch.tensor([0, 0, 0, 0])
    neighbour_labels = torch.tensor([1, 2, 1, 2, 2])

    # Execute
    point = prior_frontier(local, local_labels, neighbour, neighbour_labels, (0,))

    # Assert: a bias in (0.5, 2.0) gets every own image and the 4 right neighbours:
    # harmonic mean 2 * 1 * 0.8 / 1.8, against zero-shot's 2 * 0.25 * 0.8 / 1.05
    assert (point.local_correct, point.neighbour_correct) == (4, 4)
    assert 0.5 < point.bias < 2.0
    assert harmonic_mean(1.0, 0.8) > harmonic_mean(0.25, 0.8)
    # ... and the bias it names, applied to the logits, gives the counts it reports
    assert _biased_hits(local, local_labels, (0,), point.bias) == 4
    assert _biased_hits(neighbour, neighbour_labels, (0,), point.bias) == 4


def test_where_no_bias_helps_the_frontier_is_zero_shot_at_bias_zero() -> None:
    # Prepare: zero-shot already gets every image right; any bias that flips the
    # neighbour images (gap 1.0) loses them
    local = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    neighbour = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])

    point = prior_frontier(local, torch.tensor([0, 0]), neighbour, torch.tensor([1, 2]), (0,))

    assert (point.bias, point.local_correct, point.neighbour_correct) == (0.0, 2, 2)


def test_no_bias_on_a_fine_grid_beats_the_exact_frontier() -> None:
    # Prepare: random logits of 10 classes, the client holds 3; zero-shot better than
    # chance
    gen = torch.Generator().manual_seed(0)
    own = (1, 4, 7)
    local_labels = torch.tensor(own).repeat(20)
    neighbour_labels = torch.tensor([c for c in range(10) if c not in own]).repeat(10)
    local = torch.randn(local_labels.numel(), 10, generator=gen)
    neighbour = torch.randn(neighbour_labels.numel(), 10, generator=gen)
    local[torch.arange(local.shape[0]), local_labels] += 1.0
    neighbour[torch.arange(neighbour.shape[0]), neighbour_labels] += 1.0
    for logits in (local, neighbour):  # ... and leaning away from the own classes
        logits[:, list(own)] -= 1.0

    # Execute
    point = prior_frontier(local, local_labels, neighbour, neighbour_labels, own)

    # Assert: its harmonic mean is at least that of every bias on a grid of 2001 (b = 0
    # included, which is zero-shot) and of b = +inf, and its bias reproduces its counts
    def hm(bias: float) -> float:
        return harmonic_mean(_biased_hits(local, local_labels, own, bias) / 60,
                             _biased_hits(neighbour, neighbour_labels, own, bias) / 70)

    best = harmonic_mean(point.local_correct / 60, point.neighbour_correct / 70)
    grid = [8.0 * i / 2000 for i in range(2001)] + [math.inf]
    assert best >= max(hm(b) for b in grid) - 1e-12
    assert best > hm(0.0)  # a class prior does beat zero-shot here
    assert hm(point.bias) == pytest.approx(best)


def test_a_client_without_neighbour_images_keeps_zero_shot() -> None:
    local = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    empty = torch.zeros(0, 2)

    point = prior_frontier(local, torch.tensor([0, 0]), empty, torch.zeros(0, dtype=torch.long),
                           (0,))

    assert (point.bias, point.local_correct, point.neighbour_correct) == (0.0, 1, 0)
