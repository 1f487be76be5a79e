"""Partitions: the paper's pathological split, Dirichlet and IID, and the test-set views."""

from __future__ import annotations

import numpy as np
import pytest

from dpfpl_app.config import Partitioner
from dpfpl_app.data.partition import (
    client_partitions,
    domain_partitions,
    partition_train,
    pathological_classes,
)


def _shuffled_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    np.random.default_rng(seed).shuffle(labels)
    return labels


# --- pathological ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_classes", "num_clients", "sizes"),
    [
        (100, 10, [10] * 10),
        (37, 10, [4] * 9 + [1]),  # round(3.7) = 4 each, the remainder (1) to the last
        (10, 10, [1] * 10),
        (100, 7, [14] * 6 + [16]),  # round(14.3) = 14 each, the last takes the other 16
        (7, 1, [7]),
    ],
)
def test_pathological_class_groups(num_classes: int, num_clients: int, sizes: list[int]) -> None:
    # Execute
    groups = pathological_classes(num_classes, num_clients, seed=0)

    # Assert: the sizes, no class shared, every class owned
    assert [len(g) for g in groups] == sizes
    owned = np.concatenate(groups)
    assert len(np.unique(owned)) == len(owned) == num_classes


def test_pathological_classes_are_shuffled_with_the_seed() -> None:
    # Execute
    a = pathological_classes(100, 10, seed=0)
    a_again = pathological_classes(100, 10, seed=0)
    b = pathological_classes(100, 10, seed=1)

    # Assert: deterministic for a seed, different across seeds, not the identity order
    assert all(np.array_equal(x, y) for x, y in zip(a, a_again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], np.arange(10))


@pytest.mark.parametrize(("num_classes", "num_clients"), [(10, 11), (15, 10), (3, 4)])
def test_pathological_with_too_many_clients_raises(num_classes: int, num_clients: int) -> None:
    with pytest.raises(ValueError, match=rf"{num_classes} classes over {num_clients} clients.*"
                       "leaves a client without classes"):
        pathological_classes(num_classes, num_clients, seed=0)


def test_pathological_with_no_clients_raises() -> None:
    with pytest.raises(ValueError, match="num-partitions must be >= 1, got 0"):
        pathological_classes(10, 0, seed=0)


def test_pathological_train_split_gives_each_class_wholly_to_one_client() -> None:
    # Prepare: 37 classes with uneven class sizes
    rng = np.random.default_rng(3)
    labels = np.concatenate([np.full(rng.integers(2, 9), c) for c in range(37)])
    rng.shuffle(labels)

    # Execute
    parts = partition_train(labels, 10, kind=Partitioner.PATHOLOGICAL, seed=0)

    # Assert: every image exactly once, and all images of a class on one client
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    for c in range(37):
        holders = [i for i, p in enumerate(parts) if np.any(labels[p] == c)]
        assert len(holders) == 1
        assert np.array_equal(np.sort(parts[holders[0]][labels[parts[holders[0]]] == c]),
                              np.flatnonzero(labels == c))


def test_pathological_local_and_neighbour_test_views() -> None:
    # Prepare
    train_labels = _shuffled_labels(20, 6, seed=0)
    test_labels = _shuffled_labels(20, 3, seed=1)

    # Execute
    clients = client_partitions(train_labels, test_labels, 5, kind=Partitioner.PATHOLOGICAL, seed=0)

    # Assert
    seen_local = []
    for client in clients:
        own = set(np.unique(train_labels[client.train]).tolist())
        assert set(client.classes.tolist()) == own and len(own) == 4
        local = set(test_labels[client.local_test].tolist())
        neighbour = set(test_labels[client.neighbour_test].tolist())
        assert local == own  # every own class, nothing else
        assert not neighbour & own  # never its own classes
        # together: the whole test pool, each image once
        both = np.concatenate([client.local_test, client.neighbour_test])
        assert np.array_equal(np.sort(both), np.arange(len(test_labels)))
        seen_local.append(client.local_test)
    # every test image is some client's local test image exactly once
    assert np.array_equal(np.sort(np.concatenate(seen_local)), np.arange(len(test_labels)))


# --- Dirichlet and IID ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [Partitioner.DIRICHLET, Partitioner.IID])
def test_label_partitioners_cover_every_train_sample_exactly_once(kind: Partitioner) -> None:
    # Prepare
    labels = _shuffled_labels(10, 30, seed=0)

    # Execute
    parts = partition_train(labels, 5, kind=kind, seed=0, dirichlet_alpha=0.3)

    # Assert
    assert len(parts) == 5 and all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("kind", [Partitioner.DIRICHLET, Partitioner.IID])
def test_more_clients_than_images_are_refused_naming_both_counts(kind: Partitioner) -> None:
    # issue 16: 1000 clients on 754 images failed in every ClientApp with an IndexError
    labels = _shuffled_labels(3, 4, seed=0)  # 12 images

    with pytest.raises(ValueError, match="13 clients cannot each get one of the 12"):
        partition_train(labels, 13, kind=kind, seed=0)


def test_dirichlet_is_deterministic_for_a_seed_and_skewed() -> None:
    # Prepare
    labels = _shuffled_labels(10, 30, seed=0)

    # Execute
    a = partition_train(labels, 5, kind=Partitioner.DIRICHLET, seed=0, dirichlet_alpha=0.3)
    again = partition_train(labels, 5, kind=Partitioner.DIRICHLET, seed=0, dirichlet_alpha=0.3)
    b = partition_train(labels, 5, kind=Partitioner.DIRICHLET, seed=1, dirichlet_alpha=0.3)

    # Assert: same seed same split; another seed another split; alpha=0.3 skews labels
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    shares = [np.bincount(labels[p], minlength=10) / len(p) for p in a]
    assert max(s.max() for s in shares) > 0.3  # a uniform mix would be 0.1 per class


def test_dirichlet_test_views_follow_the_clients_classes() -> None:
    # Prepare
    train_labels = _shuffled_labels(10, 30, seed=0)
    test_labels = _shuffled_labels(10, 10, seed=1)

    # Execute
    clients = client_partitions(
        train_labels, test_labels, 4, kind=Partitioner.DIRICHLET, seed=0, dirichlet_alpha=0.3
    )

    # Assert: local test only of classes the client trains on; neighbour test never of them;
    # every test image is exactly one client's local test image
    for client in clients:
        own = set(client.classes.tolist())
        assert set(test_labels[client.local_test].tolist()) <= own
        assert not set(test_labels[client.neighbour_test].tolist()) & own
    owners = np.concatenate([c.local_test for c in clients])
    assert np.array_equal(np.sort(owners), np.arange(len(test_labels)))


def test_iid_split_does_not_depend_on_the_pool_order() -> None:
    # Prepare: a pool stored class by class
    labels = np.repeat(np.arange(10), 30)

    # Execute
    parts = partition_train(labels, 5, kind=Partitioner.IID, seed=0)

    # Assert: 60 IID draws from 10 equally likely classes miss a class with prob ~1e-2
    assert all(len(np.unique(labels[p])) >= 8 for p in parts)


def test_domain_partitions_split_classes_within_each_domain() -> None:
    # Prepare: 10 classes of 30 images; 12 clients in 3 domains (client i in domain i % 3)
    labels = np.repeat(np.arange(10), 30)
    test = np.repeat(np.arange(10), 5)

    # Execute
    parts = domain_partitions(labels, test, 12, domains=3, kind=Partitioner.PATHOLOGICAL, seed=0)

    # Assert: every image held once; each domain holds every class, split by class among
    # its 4 clients; the domains' shares are disjoint and class-stratified
    held = np.concatenate([p.train for p in parts])
    assert sorted(held.tolist()) == list(range(len(labels)))
    for d in range(3):
        members = [parts[i] for i in range(d, 12, 3)]
        classes = [set(m.classes.tolist()) for m in members]
        assert set().union(*classes) == set(range(10))
        assert all(not (a & b) for i, a in enumerate(classes) for b in classes[i + 1 :])
        share = np.concatenate([m.train for m in members])
        assert sorted(np.bincount(labels[share]).tolist()) == [10] * 10
    with pytest.raises(ValueError, match="3 domains need at least as many clients"):
        domain_partitions(labels, test, 2, domains=3, kind=Partitioner.PATHOLOGICAL, seed=0)


def test_a_process_splits_the_pools_once_for_all_the_clients_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # issue 16: a simulated actor serving 100 clients re-split 49,000 labels per message
    from dpfpl_app.config import RunConfig
    from dpfpl_app.data import federated_data

    calls = []
    real = federated_data.client_partitions
    monkeypatch.setattr(
        federated_data, "client_partitions", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    federated_data._partitioning.cache_clear()
    cfg = RunConfig.from_flower({"dataset": "digits", "partitioner": "iid"})

    first = federated_data.partitions_for(cfg, 7)
    again = federated_data.partitions_for(cfg, 7)
    other = federated_data.partitions_for(cfg, 8)

    assert again is first and len(calls) == 2 and len(other) == 8
    # one client's view is built from the shared split, and is the same every time
    assert np.array_equal(first[3].neighbour_test, again[3].neighbour_test)
    federated_data._partitioning.cache_clear()
