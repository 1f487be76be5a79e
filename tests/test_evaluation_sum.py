"""The counts a node adds to a secure run's evaluation sum (``evaluation_sum``)."""

from __future__ import annotations

import numpy as np
import pytest

from dpfpl_app.federation import evaluation_sum
from dpfpl_app.federation.evaluation_sum import DIM, MAX_EXAMPLES, NodeCounts, secagg_config
from dpfpl_app.secagg import Stage
from tests.secagg_harness import Federation


def test_counts_at_the_public_bound_sum_exactly_through_secagg() -> None:
    # Prepare: 10 nodes, every count at (or next to) the largest a node may hold
    nodes = [101 + 7 * i for i in range(10)]
    counts = {
        v: NodeCounts(MAX_EXAMPLES - i, MAX_EXAMPLES, i, MAX_EXAMPLES - i, 0, MAX_EXAMPLES - i,
                      MAX_EXAMPLES, MAX_EXAMPLES - i)
        for i, v in enumerate(nodes)
    }

    # Execute
    result = Federation(secagg_config(DIM), {v: c.vector() for v, c in counts.items()}).run()

    # Assert: the integer sum is exact (no rounding, no noise, no wrap)
    expected = np.sum([c.vector() for c in counts.values()], axis=0).astype(np.int64)
    np.testing.assert_array_equal(result.integer_total, expected)
    assert result.survivors == tuple(nodes)


def test_the_evaluation_sum_is_released_only_from_every_sampled_node() -> None:
    config = secagg_config(DIM)
    counts = {v: NodeCounts(3, 5, 1, 2, 2, 1, 4, 1).vector() for v in (11, 22, 33, 44, 55)}

    with pytest.raises(Exception, match="min_survivors 5"):
        Federation(config, counts).run(drop={Stage.COLLECT_MASKED: {33}})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((3, 2, 0, 0, 0, 0, 0, 0), "local_correct exceeds local_examples"),
        ((0, 0, 0, 4, 0, 5, 0, 0), "zeroshot_neighbour_correct exceeds neighbour_examples"),
        ((0, 2, 0, 4, 0, 0, 3, 0), "prior_local_correct exceeds local_examples"),
        ((0, 2, 0, 4, 0, 0, 0, 5), "prior_neighbour_correct exceeds neighbour_examples"),
        ((0, MAX_EXAMPLES + 1, 0, 0, 0, 0, 0, 0), "local_examples=16777217 is not an integer in"),
        ((-1, 0, 0, 0, 0, 0, 0, 0), "local_correct=-1"),
    ],
)
def test_counts_out_of_their_bounds_are_refused(fields: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodeCounts(*fields)


def test_a_server_asking_for_another_vector_length_is_refused() -> None:
    with pytest.raises(ValueError, match="an evaluation sum has 12 counts"):
        secagg_config(DIM + 1)


def test_accuracies_are_correct_over_examples_and_skip_empty_sets() -> None:
    # one node with local images only: no neighbour accuracy, no harmonic mean
    figures = NodeCounts(30, 40, 0, 0, 20, 0, 36, 0).accuracies()

    assert figures == {
        "local-acc": 0.75, "zeroshot-local-acc": 0.5, "prior-local-acc": 0.9,
        "all-acc": 0.75, "zeroshot-all-acc": 0.5, "prior-all-acc": 0.9,
    }


def test_the_sum_gives_the_mean_over_nodes_of_their_harmonic_means() -> None:
    # Prepare: (local, neighbour) correct of 10 local and 40 neighbour images per node;
    # the third node has no neighbour images (it holds every class): no harmonic mean
    nodes = [
        NodeCounts(9, 10, 10, 40, 5, 20, 8, 30),  # hm 2*.9*.25/1.15, zs .5, prior 2*.8*.75/1.55
        NodeCounts(10, 10, 0, 40, 4, 12, 6, 24),  # hm 0, zs 2*.4*.3/.7, prior .6
        NodeCounts(7, 10, 0, 0, 7, 0, 7, 0),
    ]
    expected = {
        "harmonic-acc": (2 * 0.9 * 0.25 / 1.15 + 0.0) / 2,
        "zeroshot-harmonic-acc": (0.5 + 2 * 0.4 * 0.3 / 0.7) / 2,
        "prior-harmonic-acc": (2 * 0.8 * 0.75 / 1.55 + 0.6) / 2,
    }

    # Execute: the vectors go through a real SecAgg+ sum
    result = Federation(
        secagg_config(DIM), {101 + i: n.vector() for i, n in enumerate(nodes)}
    ).run()
    figures = evaluation_sum.accuracies(result.integer_total)

    # Assert: the per-node harmonic means averaged (fixed point: within 2^-21), and
    # all-class accuracy is the example-weighted one over the sum
    for name, value in expected.items():
        assert figures[name] == pytest.approx(value, abs=2**-21)
    assert figures["all-acc"] == (9 + 10 + 10 + 0 + 7) / 110
    assert figures["prior-all-acc"] == (8 + 30 + 6 + 24 + 7) / 110
