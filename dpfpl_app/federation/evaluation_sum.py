"""Evaluation under secure aggregation: the counts each node adds to one SecAgg+ sum.

In a secure run a node's evaluation figures never leave it one by one: its test-set
accuracies and example counts would sketch its label mix (in simulation the test split
follows the training class counts). Each node puts exact integer counts into a vector
(``FIELDS``: correct predictions and examples, for local and neighbour accuracy, the
zero-shot template's and the class-prior frontier's correct predictions on the same
images, and the harmonic-mean block below), and the server learns only their sum over
the sampled nodes (``secure_evaluation``). From it come the federation-wide accuracies:
sum of correct / sum of examples, i.e. the EXAMPLE-WEIGHTED mean over clients, where a
plain run's ``local-acc`` is the unweighted mean over clients (``all-acc`` likewise).

The headline harmonic mean is per client, then averaged (``method.accuracy``): no sum of
counts gives it. So each node adds, beside its counts, whether it has a harmonic mean
(1 with both local and neighbour test images, else 0) and its harmonic means of the
prompt, zero-shot and the prior in fixed point (``HARMONIC_SCALE``, rounded): the sum
divided by the number of such nodes is the same mean over clients a plain run reports,
up to 2^-21 of rounding. The values are of the counts' kind (a function of the node's
test figures) and stay within the counts' public bound.

Why the counts are exact: the SecAgg config has scale 1 (a count is its own fixed-point
value: randomised rounding floor(x + u), u in [0, 1), leaves an integer unchanged), no
noise (test-set counts are not a DP release; see docs/secure-evaluation.md for what the
sum still tells), and an L2 bound that every vector of counts up to ``MAX_EXAMPLES`` per
coordinate meets; the ring is sized by ``secagg.params.ring_bits`` for that bound, so
the sum cannot wrap. Every sampled node must survive (``require_all``): a sum is over
the whole sample or is not released.

This module is imported by the key-exchange stages (``secure_client``): numpy only, no
torch (``wire`` imports torch, so the server maps these names to its keys itself).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dpfpl_app.method.accuracy import harmonic_mean
from dpfpl_app.secagg import SecAggConfig

logger = logging.getLogger(__name__)

EVALUATION = "evaluation"  # the secure round's purpose (``secure_client.config_for_purpose``)
MAX_EXAMPLES = 2**24
"""Public bound on a node's test examples (16.8 million): every count is in [0, this]."""
NODE_RECORD = "evaluation.jsonl"
"""The node's own figures, one line per evaluation it answered, in its state directory."""


@dataclass(frozen=True)
class NodeCounts:
    """One node's evaluation counts: the only thing it adds to the secure sum."""

    local_correct: int
    local_examples: int
    neighbour_correct: int
    neighbour_examples: int
    zeroshot_local_correct: int
    zeroshot_neighbour_correct: int
    prior_local_correct: int
    prior_neighbour_correct: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or not 0 <= value <= MAX_EXAMPLES:
                raise ValueError(
                    f"evaluation count {name}={value!r} is not an integer in [0, {MAX_EXAMPLES}]"
                    " (the secure evaluation sum's public bound per node)"
                )
        for correct, examples in (
            ("local_correct", "local_examples"),
            ("zeroshot_local_correct", "local_examples"),
            ("prior_local_correct", "local_examples"),
            ("neighbour_correct", "neighbour_examples"),
            ("zeroshot_neighbour_correct", "neighbour_examples"),
            ("prior_neighbour_correct", "neighbour_examples"),
        ):
            if getattr(self, correct) > getattr(self, examples):
                raise ValueError(f"evaluation count {correct} exceeds {examples}")

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> NodeCounts:
        """From ``ClientTrainer.evaluate``'s figures (its ``*-correct`` and ``*-examples``)."""
        return cls(**{name: _count(metrics[name.replace("_", "-")]) for name in COUNTS})

    def vector(self) -> np.ndarray:
        """The secure sum's input in ``FIELDS`` order, as float64: the counts, then the
        harmonic-mean block (whether the node has one, and each in fixed point).
        """
        has_both = self.local_examples > 0 and self.neighbour_examples > 0
        block = [int(has_both)]
        for prefix in ("", "zeroshot_", "prior_"):
            if not has_both:
                block.append(0)
                continue
            local = getattr(self, f"{prefix}local_correct") / self.local_examples
            neighbour = getattr(self, f"{prefix}neighbour_correct") / self.neighbour_examples
            block.append(round(HARMONIC_SCALE * harmonic_mean(local, neighbour)))
        counts = [getattr(self, name) for name in COUNTS]
        return np.array([*counts, *block], dtype=np.float64)

    def accuracies(self) -> dict[str, float]:
        """The node's own accuracies (for its log and its record, never for a reply)."""
        return accuracies(self.vector())


HARMONIC_SCALE = 2**20
"""Fixed point of a node's harmonic means in the sum (within the counts' bound)."""
COUNTS = tuple(NodeCounts.__dataclass_fields__)
HARMONIC_FIELDS = ("harmonic_nodes", "harmonic_fixed", "zeroshot_harmonic_fixed",
                   "prior_harmonic_fixed")
FIELDS = COUNTS + HARMONIC_FIELDS
DIM = len(FIELDS)


def secagg_config(dim: int) -> SecAggConfig:
    """The SecAgg config of an evaluation sum (the module docstring says why exact).

    ``dim`` is the server's word at setup; any other length than ``FIELDS`` is refused.
    """
    if dim != DIM:
        raise ValueError(
            f"an evaluation sum has {DIM} counts ({', '.join(FIELDS)}), the server asked for "
            f"{dim}: the ServerApp and this node run different dpfpl versions"
        )
    return SecAggConfig(dim=DIM, clip=MAX_EXAMPLES * math.sqrt(DIM), scale=1.0, require_all=True)


RATIOS = {  # accuracy name (the trainer's and the wire's) -> (correct, examples) fields
    "local-acc": ("local_correct", "local_examples"),
    "neighbour-acc": ("neighbour_correct", "neighbour_examples"),
    "zeroshot-local-acc": ("zeroshot_local_correct", "local_examples"),
    "zeroshot-neighbour-acc": ("zeroshot_neighbour_correct", "neighbour_examples"),
    "prior-local-acc": ("prior_local_correct", "local_examples"),
    "prior-neighbour-acc": ("prior_neighbour_correct", "neighbour_examples"),
}
ALL_CLASS = {  # all-class accuracy -> (local correct, neighbour correct) fields
    "all-acc": ("local_correct", "neighbour_correct"),
    "zeroshot-all-acc": ("zeroshot_local_correct", "zeroshot_neighbour_correct"),
    "prior-all-acc": ("prior_local_correct", "prior_neighbour_correct"),
}
HARMONIC = {  # harmonic mean -> its fixed-point field
    "harmonic-acc": "harmonic_fixed",
    "zeroshot-harmonic-acc": "zeroshot_harmonic_fixed",
    "prior-harmonic-acc": "prior_harmonic_fixed",
}


def accuracies(counts: np.ndarray) -> dict[str, float]:
    """Correct / examples for each accuracy of ``RATIOS`` and ``ALL_CLASS``, and the
    mean harmonic means of ``HARMONIC`` (none without examples).

    Of one node's counts: that node's figures. Of a released sum: the federation-wide
    (example-weighted) accuracies and the mean over nodes of their harmonic means.
    """
    values = np.asarray(counts, dtype=np.float64).reshape(-1)
    if values.shape != (DIM,) or not np.all(values == np.rint(values)) or values.min() < 0:
        raise ValueError(f"evaluation counts must be {DIM} non-negative integers, got {values}")
    c = dict(zip(FIELDS, (int(v) for v in values), strict=True))
    out = {
        name: c[correct] / c[examples]
        for name, (correct, examples) in RATIOS.items()
        if c[examples] > 0
    }
    examples = c["local_examples"] + c["neighbour_examples"]
    for name, (local, neighbour) in ALL_CLASS.items():
        if examples > 0:
            out[name] = (c[local] + c[neighbour]) / examples
    for name, fixed in HARMONIC.items():
        if c["harmonic_nodes"] > 0:
            out[name] = c[fixed] / (HARMONIC_SCALE * c["harmonic_nodes"])
    return out


def keep_on_node(directory: Path, server_round: int, counts: NodeCounts) -> Path:
    """Log this node's figures and append them to its record (0600), on the node only."""
    line = {"round": server_round, **asdict(counts), **counts.accuracies()}
    logger.info("evaluation round %d on this node (kept here, not sent): %s", server_round,
                json.dumps(line))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / NODE_RECORD
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also a record some earlier tool left readable
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)
    return path


def read_node_record(directory: Path) -> list[dict[str, float | int]]:
    """The node's evaluation record, oldest first (for its operator, and tests)."""
    path = directory / NODE_RECORD
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _count(value: float) -> int:
    if float(value) != int(value):
        raise ValueError(f"an evaluation count must be an integer, got {value!r}")
    return int(value)
