"""The arithmetic of the headline metrics: harmonic mean and all-class accuracy.

With a pathological split, a prompt that always answers "one of my classes" scores
high local accuracy and nothing on the classes the client lacks; the harmonic mean of
local and neighbour accuracy punishes that (it is near the smaller of the two), and the
all-class accuracy over the client's whole test view (local and neighbour images,
every class) weighs both sides by their images. A run's headline ``harmonic-acc`` is
the MEAN OVER CLIENTS OF EACH CLIENT'S harmonic mean (the issue asks for the metric
per client, then averaged), never the harmonic mean of the averaged accuracies: a
federation of one-sided clients must not look balanced because the sides average out.

Pure Python: the secure evaluation's key-exchange stages import it (no torch there).
"""

from __future__ import annotations


def harmonic_mean(local: float, neighbour: float) -> float:
    """2 l n / (l + n) of two accuracies in [0, 1]; 0 when both are 0."""
    total = local + neighbour
    return 0.0 if total <= 0 else 2.0 * local * neighbour / total


def all_class(local_correct: float, local_examples: int, neighbour_correct: float,
              neighbour_examples: int) -> float | None:
    """Accuracy over the client's whole test view (None without any test image)."""
    examples = local_examples + neighbour_examples
    return None if examples == 0 else (local_correct + neighbour_correct) / examples
