"""Who holds which images: the paper's pathological split, Dirichlet label skew, IID.

Every function returns index arrays into the train (and test) pools, is deterministic
for a seed, never truncates a client to the smallest client's size (a defect of the
public code: whole classes vanished), and refuses a configuration that would leave a
client empty. Dirichlet and IID use flwr-datasets' partitioners on the label column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dpfpl_app.config import Partitioner


@dataclass(frozen=True)
class ClientPartition:
    """One client's share: its train images, its own test images, and its neighbours'."""

    train: np.ndarray  # indices into the train pool
    local_test: np.ndarray  # indices into the test pool: the client's own test data
    neighbour_test: np.ndarray  # test images of classes this client does not hold
    classes: np.ndarray  # the classes present in this client's training data


@dataclass(frozen=True, eq=False)
class Partitioning:
    """All clients' train and local-test indices; ``[i]`` is client i's whole view."""

    train_labels: np.ndarray
    test_labels: np.ndarray
    train: list[np.ndarray]
    local_test: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, client: int) -> ClientPartition:
        """Client ``client``'s share; neighbour data = test images of classes it lacks."""
        train = self.train[client]
        classes = np.unique(self.train_labels[train])
        neighbour = np.flatnonzero(~np.isin(self.test_labels, classes))
        return ClientPartition(train, self.local_test[client], neighbour, classes)

    def __iter__(self) -> Iterator[ClientPartition]:
        return (self[i] for i in range(len(self)))


def pathological_classes(num_classes: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle classes with the seed; round(C/N) each, the remainder to the last client."""
    if num_clients < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_clients}")
    per_client = round(num_classes / num_clients)
    if per_client < 1 or per_client * (num_clients - 1) >= num_classes:
        raise ValueError(
            f"the pathological split of {num_classes} classes over {num_clients} clients "
            f"gives round(C/N)={per_client} classes each and leaves a client without "
            f"classes: use at most {num_classes} clients (fewer if C/N rounds up), or the "
            "dirichlet/iid partitioner"
        )
    order = np.random.default_rng(seed).permutation(num_classes)
    groups = [order[i * per_client : (i + 1) * per_client] for i in range(num_clients - 1)]
    groups.append(order[(num_clients - 1) * per_client :])
    return [np.sort(g) for g in groups]


def _flwr_partition(labels: np.ndarray, partitioner: object) -> list[np.ndarray]:
    from datasets import Dataset

    table = Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    partitioner.dataset = table  # type: ignore[attr-defined]
    n = partitioner.num_partitions  # type: ignore[attr-defined]
    # the index column read as one numpy slice: row by row costs ~30 ms per 1000 rows
    parts = (partitioner.load_partition(i) for i in range(n))  # type: ignore[attr-defined]
    return [np.sort(p.with_format("numpy")[:]["index"].astype(np.int64)) for p in parts]


def partition_train(
    labels: np.ndarray,
    num_clients: int,
    *,
    kind: Partitioner,
    seed: int,
    dirichlet_alpha: float = 0.3,
) -> list[np.ndarray]:
    """Train-pool indices of every client."""
    if kind is Partitioner.PATHOLOGICAL:
        groups = pathological_classes(int(labels.max()) + 1, num_clients, seed=seed)
        return [np.flatnonzero(np.isin(labels, g)) for g in groups]
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_clients > len(labels):  # flwr-datasets would fail deep inside with an IndexError
        raise ValueError(
            f"{num_clients} clients cannot each get one of the {len(labels)} training images: "
            "use fewer clients (num-partitions / SuperNodes) or a larger dataset"
        )
    if kind is Partitioner.IID:
        # IidPartitioner takes contiguous shards: shuffle first so a pool stored class by
        # class still gives every client every class
        order = np.random.default_rng(seed).permutation(len(labels))
        shards = _flwr_partition(labels[order], IidPartitioner(num_partitions=num_clients))
        parts = [np.sort(order[s]) for s in shards]
    else:
        parts = _flwr_partition(
            labels,
            DirichletPartitioner(
                num_partitions=num_clients,
                partition_by="label",
                alpha=dirichlet_alpha,
                min_partition_size=1,
                self_balancing=False,
                seed=seed,
            ),
        )
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"partitions {empty} are empty: use fewer clients or a larger dataset")
    return parts


def partition_test(
    train_labels: np.ndarray,
    train_parts: list[np.ndarray],
    test_labels: np.ndarray,
    *,
    seed: int,
) -> list[np.ndarray]:
    """Split the test pool so each client's test data follows its training class mix.

    Each test image of class c goes to client i with probability proportional to the
    share of class c's training images that client i holds. For the pathological split
    (every class held by one client) this is exactly "the test set split by the same
    classes"; for Dirichlet it gives each client test data with its own label skew.
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    counts = np.zeros((len(train_parts), num_classes))
    for i, part in enumerate(train_parts):
        counts[i] = np.bincount(train_labels[part], minlength=num_classes)
    rng = np.random.default_rng(seed + 1)
    owner = np.full(len(test_labels), -1, dtype=np.int64)
    for c in range(num_classes):
        members = np.flatnonzero(test_labels == c)
        total = counts[:, c].sum()
        if total == 0 or len(members) == 0:
            continue  # a class nobody trains on is nobody's local test data
        owner[members] = rng.choice(len(train_parts), size=len(members), p=counts[:, c] / total)
    return [np.flatnonzero(owner == i) for i in range(len(train_parts))]


def client_partitions(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    *,
    kind: Partitioner,
    seed: int,
    dirichlet_alpha: float = 0.3,
) -> Partitioning:
    """All clients' partitions; neighbour data = test images of classes a client lacks."""
    train_parts = partition_train(
        train_labels, num_clients, kind=kind, seed=seed, dirichlet_alpha=dirichlet_alpha
    )
    test_parts = partition_test(train_labels, train_parts, test_labels, seed=seed)
    return Partitioning(train_labels, test_labels, train_parts, test_parts)


def domain_partitions(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    *,
    domains: int,
    kind: Partitioner,
    seed: int,
    dirichlet_alpha: float = 0.3,
) -> Partitioning:
    """Clients ``i`` with ``i % domains == d`` form domain d; classes split WITHIN it.

    Each domain gets a disjoint, class-stratified share of the train pool and splits it
    over its own clients with ``kind`` (so every domain holds every class, and inside a
    domain the clients differ by class): SecFPP's benchmark, where clients differ by
    domain and by class at once.
    """
    if not 1 <= domains <= num_clients:
        raise ValueError(f"{domains} domains need at least as many clients, got {num_clients}")
    rng = np.random.default_rng(seed + 2)
    domain_of_image = np.empty(len(train_labels), dtype=np.int64)
    for c in np.unique(train_labels):
        members = rng.permutation(np.flatnonzero(train_labels == c))
        domain_of_image[members] = np.arange(len(members)) % domains
    train_parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for d in range(domains):
        share = np.flatnonzero(domain_of_image == d)
        clients = list(range(d, num_clients, domains))
        parts = partition_train(
            train_labels[share], len(clients), kind=kind, seed=seed + d,
            dirichlet_alpha=dirichlet_alpha,
        )
        for client, part in zip(clients, parts, strict=True):
            train_parts[client] = share[part]
    test_parts = partition_test(train_labels, train_parts, test_labels, seed=seed)
    return Partitioning(train_labels, test_labels, train_parts, test_parts)
