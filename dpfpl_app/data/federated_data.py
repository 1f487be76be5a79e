"""The data a federated run trains and tests on, and one client's view of it.

The offline datasets contribute only their federated pool (images the offline backbone
never saw in pretraining); that pool is split per class into train and test with the
run's seed. Hub and image-folder datasets keep their official test split when they have
one (the paper's protocol) and are split the same way when they do not. The train pool
is then partitioned across clients (``partition.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dpfpl_app.backbones.backbone import FrozenClip
from dpfpl_app.config import Holdout, Partitioner, RunConfig
from dpfpl_app.data.data_sources import ImageSet, SourceSpec, load_splits
from dpfpl_app.data.features import FeatureCache
from dpfpl_app.data.image_styles import STYLED_DATASETS
from dpfpl_app.data.offline_data import DATASETS
from dpfpl_app.data.partition import Partitioning, client_partitions, domain_partitions


@dataclass(frozen=True)
class FederatedData:
    train: ImageSet
    test: ImageSet

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names


@dataclass(frozen=True)
class ClientData:
    """Features of one client's images; only its own train data is ever trained on."""

    train_features: Tensor  # (V, n, e): view 0 clean, 1..K augmented
    train_labels: Tensor  # (n,)
    local_features: Tensor  # (m, e) own-class test images
    local_labels: Tensor
    neighbour_features: Tensor  # (k, e) test images of the classes it lacks
    neighbour_labels: Tensor
    classes: tuple[int, ...]

    @property
    def num_train(self) -> int:
        return int(self.train_labels.numel())


def stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class train/test split; every class keeps at least one image on each side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(len(members) - 1, max(1, round(test_fraction * len(members))))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def source_spec(cfg: RunConfig) -> SourceSpec:
    return SourceSpec(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        class_names_file=cfg.class_names_file,
    )


@lru_cache(maxsize=4)
def load_federated_data(spec: SourceSpec, *, test_fraction: float, seed: int) -> FederatedData:
    """Train and test pools of a run's dataset."""
    # a styled dataset is its base's federated pool; clients style it (``client_data``)
    styled = STYLED_DATASETS.get(spec.dataset)
    base = styled.base if styled else spec.dataset
    if base in DATASETS:
        pool = DATASETS[base].image_set(Path(spec.data_dir) if spec.data_dir else None)
        test = None
    else:
        pool, test = load_splits(spec)
    if test is None:
        train_idx, test_idx = stratified_split(pool.labels, test_fraction=test_fraction, seed=seed)
        return FederatedData(pool.subset(train_idx), pool.subset(test_idx))
    return FederatedData(pool, test)


def validation_data(data: FederatedData, *, validation_fraction: float, seed: int) -> FederatedData:
    """The train pool split per class into train and validation; the test pool is dropped.

    Hyperparameters chosen on these figures never saw a test image. The split's seed is
    derived from the run's, so it differs from the train/test split's permutation.
    """
    train_idx, val_idx = stratified_split(
        data.train.labels, test_fraction=validation_fraction, seed=seed + 1
    )
    return FederatedData(data.train.subset(train_idx), data.train.subset(val_idx))


def partitions_for(cfg: RunConfig, num_partitions: int) -> Partitioning:
    """The run's split of its pools over ``num_partitions`` clients.

    Computed once per process: a simulated actor answers many clients' messages, and
    recomputing the split (Fashion-MNIST's 49,000 training labels over 100 clients)
    cost 2.4 s per message: a simulated round of 100 clients took 424 s, 78 s without it.
    """
    return _partitioning(
        source_spec(cfg),
        cfg.test_fraction,
        cfg.seed,
        cfg.holdout,
        cfg.dataset,
        cfg.partitioner,
        cfg.dirichlet_alpha,
        num_partitions,
    )


@lru_cache(maxsize=4)
def _partitioning(
    spec: SourceSpec,
    test_fraction: float,
    seed: int,
    holdout: Holdout,
    dataset: str,
    kind: Partitioner,
    dirichlet_alpha: float,
    num_partitions: int,
) -> Partitioning:
    data = run_pools(spec, test_fraction=test_fraction, seed=seed, holdout=holdout)
    styled = STYLED_DATASETS.get(dataset)
    if styled is not None and styled.split_by_domain:
        return domain_partitions(
            data.train.labels,
            data.test.labels,
            num_partitions,
            domains=len(styled.styles),
            kind=kind,
            seed=seed,
            dirichlet_alpha=dirichlet_alpha,
        )
    return client_partitions(
        data.train.labels,
        data.test.labels,
        num_partitions,
        kind=kind,
        seed=seed,
        dirichlet_alpha=dirichlet_alpha,
    )


@lru_cache(maxsize=4)
def run_pools(
    spec: SourceSpec, *, test_fraction: float, seed: int, holdout: Holdout
) -> FederatedData:
    """The pools a run trains and tests on: the test pool, or a validation split for tuning."""
    data = load_federated_data(spec, test_fraction=test_fraction, seed=seed)
    if holdout is Holdout.VALIDATION:
        return validation_data(data, validation_fraction=test_fraction, seed=seed)
    return data


def client_data(
    cfg: RunConfig,
    clip: FrozenClip,
    cache: FeatureCache,
    *,
    partition_id: int,
    num_partitions: int,
) -> ClientData:
    """Features and labels of one client's train, local-test and neighbour-test images."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id} is outside [0, num-partitions={num_partitions}): "
            "check the SuperNode's --node-config"
        )
    data = run_pools(
        source_spec(cfg), test_fraction=cfg.test_fraction, seed=cfg.seed, holdout=cfg.holdout
    )
    part = partitions_for(cfg, num_partitions)[partition_id]
    train, test = data.train.subset(part.train), data.test
    if cfg.dataset in STYLED_DATASETS:  # this client sees its train and test images styled
        style = STYLED_DATASETS[cfg.dataset].style_of(partition_id)
        train, test = train.styled(style), test.styled(style)
    train_feats = cache.features(clip, train, views=cfg.feature_views, seed=cfg.seed)
    # the test pool is encoded once (per style) and shared by the clients on the node
    test_feats = cache.features(clip, test, views=0, seed=cfg.seed)[0]
    test_labels = torch.from_numpy(data.test.labels)
    return ClientData(
        train_features=train_feats,
        train_labels=torch.from_numpy(train.labels),
        local_features=test_feats[part.local_test],
        local_labels=test_labels[part.local_test],
        neighbour_features=test_feats[part.neighbour_test],
        neighbour_labels=test_labels[part.neighbour_test],
        classes=tuple(int(c) for c in part.classes),
    )
